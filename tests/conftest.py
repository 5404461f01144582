import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """A small NCHW classifier with a functional relu call site, batch norm and dropout: every behaviour CAS must keep."""

    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.block(x))
        x = x.mean(dim=(2, 3))
        return self.fc(self.drop(x))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
