"""casify.models: the paper's CIFAR architectures through timm, and the small shared-model builders and loader."""
import pytest
import timm
import torch

import casify
import casify.models  # noqa: F401  (registers the CIFAR models with timm)
from casify.models import (SHARED_MODELS, cifar_cnn_a, load_shared_model, mnist_wong_kolter, paper_cas_layers,
                           resnet2b, resnet4b)

# Small widths keep every check fast on a CPU; the structure (and the CAS placement) is the paper's.
SMALL = {
    "cifar_resnet18": dict(width=0.125),
    "cifar_wrn34_10": dict(widen_factor=1),
    "cifar_vgg16": dict(width=0.125),
}
PAPER_LAYERS = {
    "cifar_resnet18": ["layer4.0", "layer4.1"],
    "cifar_wrn34_10": ["block3.layer.4.relu1", "relu"],
    "cifar_vgg16": ["features.36", "features.39", "features.42"],
}


def _x(n=2, c=3, side=32):
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_shape_and_timm_config(name):
    model = timm.create_model(name, num_classes=7, **SMALL[name]).eval()
    assert model(_x()).shape == (2, 7)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == (0, 0, 0) and tuple(cfg["std"]) == (1, 1, 1)  # raw [0, 1] pixels, as in the paper
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(data_cfg["mean"]) == (0, 0, 0) and tuple(data_cfg["std"]) == (1, 1, 1)
    assert model.get_classifier().out_features == 7
    feats = model.forward_features(_x())
    assert feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(_x()).shape == (2, 3)
    assert name in timm.list_models("cifar_*")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrap_with_the_papers_placement_keeps_keys_and_outputs(name):
    model = timm.create_model(name, num_classes=10, **SMALL[name]).eval()
    assert paper_cas_layers(model) == PAPER_LAYERS[name]
    x = _x()
    with torch.no_grad():
        expected = model(x)
    keys = set(model.state_dict())
    wrapped = casify.wrap(model, layers=PAPER_LAYERS[name]).eval()
    assert wrapped.casify_config["cas"]["layers"] == PAPER_LAYERS[name]
    with torch.no_grad():
        out = wrapped(x)
    assert torch.allclose(out, expected, atol=1e-5)  # identity init: nothing changes at insertion
    wrapped_keys = set(wrapped.state_dict())
    assert keys <= wrapped_keys and all(k.startswith("cas_modules.") for k in wrapped_keys - keys)
    assert len({k.split(".")[1] for k in wrapped_keys - keys}) == len(PAPER_LAYERS[name])
    assert casify.wrap(model, layers="auto").casify_config["cas"]["layers"]


def test_paper_placement_at_full_size_has_the_papers_channels():
    expected = {"cifar_resnet18": [512, 512], "cifar_vgg16": [512, 512, 512]}
    for name, channels in expected.items():
        model = timm.create_model(name)
        wrapped = casify.wrap(model, layers=paper_cas_layers(model))
        assert list(wrapped.casify_config["cas"]["channels"].values()) == channels
    assert sum(p.numel() for p in timm.create_model("cifar_resnet18").parameters()) == 11_173_962


def test_resnet18_keeps_the_reference_names_and_spatial_sizes():
    model = timm.create_model("cifar_resnet18")
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
                "layer4.1.conv2.weight", "linear.weight", "linear.bias"):
        assert key in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # identity shortcut in the first stage
    shapes = {}
    hooks = [getattr(model, f"layer{i}").register_forward_hook(
        lambda m, i, o, n=i: shapes.__setitem__(n, tuple(o.shape[1:]))) for i in range(1, 5)]
    model.eval()(_x(1))
    for h in hooks:
        h.remove()
    assert shapes == {1: (64, 32, 32), 2: (128, 16, 16), 3: (256, 8, 8), 4: (512, 4, 4)}
    assert timm.create_model("cifar_resnet18", width=0.25).layer4[1].conv2.out_channels == 128


def test_wrn_depth_and_width_kwargs():
    small = timm.create_model("cifar_wrn16_2")
    assert len(small.block3.layer) == 2 and small.num_features == 128
    assert paper_cas_layers(small) == ["block3.layer.1.relu1", "relu"]
    assert len(timm.create_model("cifar_wrn34_10", depth=16, widen_factor=1).block1.layer) == 2
    with pytest.raises(ValueError, match="6n \\+ 4"):
        timm.create_model("cifar_wrn34_10", depth=20)


def test_rebuild_from_arch_kwargs_and_features_only():
    model = timm.create_model("cifar_resnet18", num_classes=5, width=0.125)
    again = timm.create_model(model.pretrained_cfg["architecture"], num_classes=5, **model.arch_kwargs)
    again.load_state_dict(model.state_dict(), strict=True)
    features = timm.create_model("cifar_resnet18", features_only=True, width=0.125)
    assert [f.shape[-1] for f in features(_x(1))] == [32, 32, 16, 8, 4]


def test_pretrained_without_weights_is_an_error():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cifar_resnet18", pretrained=True)  # offline-ok: no weight source, so it raises


def test_in_chans():
    model = timm.create_model("cifar_resnet18", in_chans=1, width=0.125)
    assert model(_x(c=1, side=28)).shape == (2, 10)


SHARED_INPUTS = {"resnet2b": (3, 32), "resnet4b": (3, 32), "cifar_cnn_a": (3, 32), "mnist_wong_kolter": (1, 28)}


@pytest.mark.parametrize("name", sorted(SHARED_MODELS))
def test_shared_builders_round_trip_through_load_shared_model(tmp_path, name):
    builder, norm, input_size = SHARED_MODELS[name]
    model = builder().eval()
    c, side = SHARED_INPUTS[name]
    assert input_size == (c, side, side)
    x = _x(c=c, side=side)
    # The alpha-beta-CROWN ResNets are saved as {"state_dict": ..., "test_acc": ...}; the others as bare state dicts.
    payload = {"state_dict": model.state_dict(), "test_acc": 0.5} if name.startswith("resnet") else model.state_dict()
    path = tmp_path / f"{name}_adv.pth"
    torch.save(payload, path)
    loaded, normalize = load_shared_model(path)
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert normalize == (None if norm is None else {k: list(v) for k, v in norm.items()})
    wrapped = casify.wrap(loaded, layers="auto", normalize=normalize, input_size=input_size).eval()
    with torch.no_grad():
        reference = model(x if normalize is None else
                          (x - torch.tensor(normalize["mean"]).view(1, -1, 1, 1))
                          / torch.tensor(normalize["std"]).view(1, -1, 1, 1))
        assert torch.allclose(wrapped(x), reference, atol=1e-5)


def test_shared_parameter_names_match_the_published_files():
    assert [k for k in resnet2b().state_dict() if "shortcut" in k] == ["layer1.0.shortcut.0.weight",
                                                                       "layer1.0.shortcut.0.bias"]
    assert resnet4b().linear1.in_features == 512 and resnet2b().linear1.in_features == 1024
    assert list(cifar_cnn_a().state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias",
                                                "7.weight", "7.bias"]
    assert mnist_wong_kolter()[5].in_features == 1568 and cifar_cnn_a()[5].in_features == 2048


def test_load_shared_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_shared_model(tmp_path / "resnet2b.pth")
    torch.save(resnet2b().state_dict(), tmp_path / "mystery.pth")
    with pytest.raises(ValueError, match="cannot tell the architecture"):
        load_shared_model(tmp_path / "mystery.pth")
    torch.save(resnet2b().state_dict(), tmp_path / "resnet4b.pth")
    with pytest.raises(ValueError, match="does not match the resnet4b architecture"):
        load_shared_model(tmp_path / "resnet4b.pth")
    model, _ = load_shared_model(tmp_path / "mystery.pth", arch="resnet2b")
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("name", sorted(SHARED_INPUTS))
def test_shared_models_wrap_without_input_size_and_reload_by_name(tmp_path, name):
    """Registered with timm: their own input size and normalisation are known, and a saved folder names the base."""
    import casify
    base = SHARED_MODELS[name][0]()
    wrapped = casify.wrap(base, layers=[])
    channels, side = SHARED_INPUTS[name]
    assert tuple(wrapped.casify_config["cas"]["input_size"]) == (channels, side, side)
    expected = SHARED_MODELS[name][1]
    assert wrapped.casify_config["normalize"] == (None if expected is None else
                                                  {k: pytest.approx(v) for k, v in expected.items()})
    wrapped.save_pretrained(tmp_path)
    loaded = casify.from_pretrained(tmp_path)  # no model=: the base is a registered name
    x = torch.rand(2, channels, side, side)
    assert torch.equal(loaded.eval()(x), wrapped.eval()(x))
