"""Regressions: timm's data pipeline on a wrapped model, the input-range warning, copies after a training forward,
models whose training forward returns a namedtuple, and the lazily imported submodules."""
import collections
import copy
import subprocess
import sys
import warnings

import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import casify
import casify.core.host_sync
from casify import DefendedModel, InputRangeWarning
from conftest import TinyNet


def _timm_resnet18(**kwargs):
    torch.manual_seed(0)
    # A small input size keeps the pipeline and the forward fast; it must survive into the wrapped model's data config.
    return timm.create_model("resnet18", pretrained=False, num_classes=10,
                             pretrained_cfg_overlay=dict(input_size=(3, 64, 64)), **kwargs).eval()


def _image(seed=0, size=(80, 72)):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def tiny_imagenet_norm(one_thread):
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["block"], normalize="imagenet", input_size=(3, 8, 8))


# -- 1. timm's data helpers describe the wrapped model's real input ------------------------------------------------

def test_timm_pipeline_resolved_from_the_wrapped_model_does_not_normalise_twice(one_thread):
    original = _timm_resnet18()
    reference = copy.deepcopy(original)
    wrapped = casify.wrap(original, layers=["layer4"]).eval()

    cfg_orig = timm.data.resolve_data_config(model=reference)
    cfg_wrapped = timm.data.resolve_data_config(model=wrapped)
    assert tuple(cfg_wrapped["mean"]) == (0.0, 0.0, 0.0) and tuple(cfg_wrapped["std"]) == (1.0, 1.0, 1.0)
    for key in ("input_size", "interpolation", "crop_pct", "crop_mode"):
        assert cfg_wrapped[key] == cfg_orig[key], key
    assert cfg_wrapped["input_size"] == (3, 64, 64)
    assert timm.data.resolve_model_data_config(wrapped) == cfg_wrapped
    assert wrapped.default_cfg["mean"] == (0.0, 0.0, 0.0)
    assert reference.pretrained_cfg["mean"] == original.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN

    img = _image()
    x_orig = timm.data.create_transform(**cfg_orig)(img)
    x_wrapped = timm.data.create_transform(**cfg_wrapped)(img)
    assert x_wrapped.shape == x_orig.shape == (3, 64, 64)
    assert 0 <= float(x_wrapped.min()) and float(x_wrapped.max()) <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        with torch.no_grad():
            got, expected = wrapped(x_wrapped[None]), reference(x_orig[None])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_without_normalisation_inside_the_original_data_config_passes_through(one_thread):
    original = _timm_resnet18()
    wrapped = casify.wrap(original, layers=["layer4"], normalize=None)
    assert timm.data.resolve_data_config(model=wrapped) == timm.data.resolve_data_config(model=original)
    assert tuple(wrapped.pretrained_cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN


# -- 2. inputs that are clearly not pixels in [0, 1] are reported once -------------------------------------------

@pytest.mark.parametrize("kind", ["0..255", "normalised"])
def test_inputs_outside_unit_range_warn_once(tiny_imagenet_norm, kind):
    model = tiny_imagenet_norm.eval()
    x = torch.rand(2, 3, 8, 8)
    x = x * 255 if kind == "0..255" else (x - 0.45) / 0.225
    with pytest.warns(InputRangeWarning) as record:
        model(x)
    message = str(record[0].message)
    assert "[0, 1]" in message and "inside the model" in message
    assert ("255" in message) if kind == "0..255" else ("normalised" in message and "resolve_data_config" in message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        model(x)  # once per model
        twin = copy.deepcopy(model)
    with pytest.warns(InputRangeWarning):
        twin(x)  # a copy is a model of its own


def test_pixels_adversarial_pixels_and_float_overshoot_do_not_warn(tiny_imagenet_norm):
    model = tiny_imagenet_norm.eval()
    x = torch.rand(4, 3, 8, 8)
    x_adv = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    overshoot = x.clone()
    overshoot[0, 0, 0, 0], overshoot[1, 0, 0, 0] = -5e-4, 1 + 5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        for batch in (x, x_adv, overshoot, torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)):
            model(batch)
        model.train()
        with casify.route(model, labels=torch.zeros(4, dtype=torch.long)):
            model(x_adv)


def test_models_that_take_normalised_inputs_never_warn(one_thread):
    """normalize=None on an ImageNet-normalised timm model: normalised inputs are what it expects."""
    wrapped = casify.wrap(_timm_resnet18(), layers=["layer4"], normalize=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        wrapped((torch.rand(1, 3, 32, 32) - 0.45) / 0.225)


def test_models_trained_on_raw_pixels_check_too(one_thread):
    """A pretrained config with mean 0, std 1 (casify's CIFAR models) means pixels in [0, 1] with no module inside."""
    torch.manual_seed(0)
    net = TinyNet()
    net.pretrained_cfg = {"input_size": (3, 8, 8), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    wrapped = casify.wrap(net, layers=["block"]).eval()
    assert "input_normalize" not in dict(wrapped.named_children())
    with pytest.warns(InputRangeWarning, match="mean 0, std 1"):
        wrapped(torch.rand(1, 3, 8, 8) * 255)


def test_range_check_is_skipped_while_compiling(tiny_imagenet_norm, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        tiny_imagenet_norm.eval()(torch.rand(1, 3, 8, 8) * 255)


def test_on_accelerators_only_the_first_forward_in_each_mode_is_checked(tiny_imagenet_norm, monkeypatch):
    """Reading min/max back from a GPU waits for it; CPU stands in for one here."""
    monkeypatch.setattr(casify.core.host_sync, "SYNC_FREE_DEVICES", ())
    model = tiny_imagenet_norm.eval()
    bad = torch.rand(2, 3, 8, 8) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputRangeWarning)
        model(torch.rand(2, 3, 8, 8))  # checked: fine
        model(bad)  # same mode: not checked, no read-back
    model.train()
    with casify.route(model, labels=torch.zeros(2, dtype=torch.long)), pytest.warns(InputRangeWarning):
        model(bad)  # first forward in the new mode


# -- 3. copies after a training forward ----------------------------------------------------------------------------

def _trained_step(model, x, y):
    model.train()
    with casify.route(model, labels=y):
        loss = F.cross_entropy(model(x), y) + sum(F.cross_entropy(a, y) for a in casify.aux_logits(model))
    loss.backward()


def test_deepcopy_after_a_routed_training_forward_and_backward(tiny_imagenet_norm):
    model = tiny_imagenet_norm
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _trained_step(model, x, y)
    with casify.route(model, labels=y):
        model(x)  # the live aux logits carry an autograd graph
        twin = copy.deepcopy(model)
    assert isinstance(twin, DefendedModel) and twin.cas_modules.block.last_aux_logits is None
    with pytest.raises(RuntimeError, match="no auxiliary logits yet"):
        twin.cas_outputs
    assert all(m._route is None for m in casify.find_cas_modules(twin))  # the copy is outside the route context
    assert twin.stem.weight is not model.stem.weight
    twin.eval(), model.eval()
    torch.testing.assert_close(twin(x), model(x))
    _trained_step(twin, x, y)  # the copy trains, routed, on its own
    assert list(twin.cas_outputs) == ["block"]


def test_timm_model_ema_v3_after_training_forward(tiny_imagenet_norm):
    from timm.utils import ModelEmaV3
    model = tiny_imagenet_norm
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _trained_step(model, x, y)
    ema = ModelEmaV3(model, decay=0.9)
    assert isinstance(ema.module, DefendedModel) and not ema.module.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update(model, step=1)  # the first step copies (decay 0)
    for (name, e), m in zip(ema.module.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(e, m, msg=name)
    model.eval()
    torch.testing.assert_close(ema(x), model(x))
    with casify.route(ema.module, labels=y):
        ema(x)
    assert ema.module.cas_outputs["block"].shape == (4, 5)
    ema.update(model, step=2)


# -- 4. training forwards that return a namedtuple ----------------------------------------------------------------

Outputs = collections.namedtuple("Outputs", ["logits", "aux"])


class AuxHeadNet(nn.Module):
    """Returns (logits, aux) in training mode and logits in eval mode, like torchvision's GoogLeNet."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)
        self.aux = nn.Linear(8, num_classes)

    def forward(self, x):
        feats = self.relu(self.conv(x)).mean(dim=(2, 3))
        logits = self.fc(feats)
        if self.training:
            return Outputs(logits, self.aux(feats))
        return logits


@pytest.mark.parametrize("name", ["at", "trades", "mart"])
def test_losses_use_the_main_logits_of_a_namedtuple_output(one_thread, name):
    torch.manual_seed(0)
    model = casify.wrap(AuxHeadNet(), layers=["relu"], normalize=None, input_size=(3, 8, 8))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    model.train()
    loss, metrics = casify.losses.get_loss(name, cas=True)(model, x, x.clone(), y)
    loss.backward()
    assert torch.isfinite(loss) and model.fc.weight.grad is not None
    assert model.cas_modules.relu.classifier.weight.grad is not None
    if name == "at":
        with casify.route(model, labels=y):
            out = model(x)
        expected = F.cross_entropy(out.logits, y) + 2.0 * F.cross_entropy(model.cas_outputs["relu"], y)
        torch.testing.assert_close(loss, expected)


def test_torchvision_googlenet_with_aux_logits_trains_with_at_cas(one_thread):
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=10)
    model = casify.wrap(net, input_size=(3, 32, 32))  # 32x32 is enough for GoogLeNet and its aux heads
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 7])
    model.eval()
    assert model(x).shape == (2, 10)
    x_adv = casify.attacks.pgd(model, x, y, eps=4 / 255, steps=1, objective="cas")
    model.train()
    loss_fn = casify.losses.get_loss("at", cas=True)
    loss, metrics = loss_fn(model, None, x_adv, y)
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) >= {"ce_adv", "aux_ce_adv", "loss"}
    assert next(iter(model.cas_modules.values())).classifier.weight.grad is not None
    with casify.route(model, labels=y):
        out = model(x_adv)
    assert isinstance(out, torchvision.models.GoogLeNetOutputs)
    assert casify.losses.main_logits(out) is out.logits


# -- 5. submodules the README uses as attributes ------------------------------------------------------------------

def test_lazy_submodules_are_attributes_of_the_package():
    code = ("import sys, casify\n"
            "assert not any(m in sys.modules for m in ('casify.train', 'casify.evaluate', 'casify.analysis')), 'eager'\n"
            "casify.train.TrainConfig; casify.evaluate.evaluate; casify.analysis.analyze; casify.data.build_dataset\n"
            "assert {'train', 'evaluate', 'analysis', 'data'} <= set(casify.__all__) and 'train' in dir(casify)\n"
            "from casify import train, evaluate\n"
            "assert train is casify.train\n"
            "try:\n    casify.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
