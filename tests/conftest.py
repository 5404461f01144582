import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import casify


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


class ChannelsLast(nn.Module):
    """A channels-last (N, H, W, C) activation: a convolution, permuted, then LayerNorm over the channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.norm(x)  # (N, H, W, C)
        return self.head(x.mean(dim=(1, 2)))


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


class SmallConvNet(nn.Module):
    """Conv-BN-ReLU x2, conv-ReLU, pool, linear: named ReLUs (relu2, relu3) to put CAS after."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def separable_data(n: int, seed: int, num_classes: int):
    """Separable synthetic 8x8 images: a fixed random pattern per class (the same seeded draw for every caller) plus
    noise."""
    means = torch.rand(num_classes, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return (means[y] + 0.1 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


@functools.lru_cache(maxsize=None)
def _fitted_small_convnet(seed: int, steps: int, num_classes: int) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallConvNet(num_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for i in range(steps):
        x, y = separable_data(64, 100 + i, num_classes)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fit_small_convnet(seed: int = 0, steps: int = 60, num_classes: int = 4) -> nn.Module:
    """A SmallConvNet seeded with ``seed`` and trained with Adam (lr 1e-2) for ``steps`` steps of 64 fresh
    ``separable_data`` images (step i draws seed 100 + i), in eval mode. Trained once per session for each setting
    (several test files use the same net): every call returns a fresh deep copy, so a test may change its copy."""
    return copy.deepcopy(_fitted_small_convnet(seed, steps, num_classes))


def natural_loss(model, x, y):
    """CE, plus the summed auxiliary CE under label routing when the model has CAS modules: quick test training."""
    if casify.find_cas_modules(model):
        with casify.route(model, labels=y):
            return F.cross_entropy(model(x), y) + sum(F.cross_entropy(a, y) for a in casify.aux_logits(model))
    return F.cross_entropy(model(x), y)


class RoutingTrap(nn.Module):
    """Features whose effect on the logits passes only through the CAS mask when wrapped at ``relu`` (conv 1x1, ReLU,
    mean pool, linear): the tests set its weights so the argmax routing hides the gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))
