"""normalize="auto": a torchvision architecture gets its published weights' mean/std; a model with no metadata gets
none, and a warning says so."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn

import casify
from casify.core.normalize import IMAGENET_MEAN, IMAGENET_STD, NormalizeAutoWarning


def test_torchvision_models_get_their_weights_normalisation():
    wrapped = casify.wrap(tvm.resnet18(num_classes=10), layers=[], input_size=(3, 32, 32))
    assert wrapped.casify_config["normalize"] == {"mean": pytest.approx(list(IMAGENET_MEAN)),
                                                  "std": pytest.approx(list(IMAGENET_STD))}


def test_auto_says_when_it_adds_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.warns(NormalizeAutoWarning, match="no normalisation was added") as caught:
        wrapped = casify.wrap(model, layers=[], input_size=(3, 8, 8))
    assert caught[0].filename == __file__  # points at the user's wrap call
    assert wrapped.casify_config["normalize"] is None
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(wrapped.eval()(x), model.eval()(x))
