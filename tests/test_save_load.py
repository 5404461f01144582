"""save_pretrained / from_pretrained: identical outputs after a round trip, strict keys, clear errors, no pickles."""
import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

import casify
from casify import LoadError


def _trained_like(model):
    """Perturb every parameter so a round trip that silently re-initialised something would be caught."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_round_trip_timm_gives_identical_outputs(tmp_path):
    wrapped = _trained_like(casify.wrap(timm.create_model("resnet18", num_classes=10), layers=["layer4.0", "layer4.1"],
                                        init="paper", class_names=[str(i) for i in range(10)]))
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["base_model"] == {"source": "timm", "name": "resnet18",
                                    "kwargs": {"num_classes": 10, "in_chans": 3}}
    assert config["cas"]["layers"] == ["layer4.0", "layer4.1"] and config["cas"]["init"] == "paper"
    assert config["normalize"]["std"] == [0.229, 0.224, 0.225]
    assert config["class_names"][3] == "3" and "torch" in config["versions"]
    loaded = casify.from_pretrained(tmp_path)
    wrapped.eval(), loaded.eval()
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)
    for a, b in zip(loaded.cas_outputs.values(), wrapped.cas_outputs.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_round_trip_torchvision_infers_the_builder(tmp_path):
    model = torchvision.models.resnet34(num_classes=7)
    wrapped = _trained_like(casify.wrap(model, layers="auto", normalize="imagenet"))
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["base_model"] == {"source": "torchvision", "name": "resnet34", "kwargs": {"num_classes": 7}}
    loaded = casify.from_pretrained(str(tmp_path))
    wrapped.eval(), loaded.eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


def test_custom_architecture_is_passed_on_load(tmp_path, tiny_net):
    from conftest import TinyNet
    wrapped = _trained_like(casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None))
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model=MyModel"):
        casify.from_pretrained(tmp_path)
    loaded = casify.from_pretrained(tmp_path, model=TinyNet())
    wrapped.eval(), loaded.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


def test_weights_are_safetensors_not_pickles(tmp_path, tiny_net):
    casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8)).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "cas_modules.block.classifier.weight" in state and "stem.weight" in state


def test_missing_or_mismatched_keys_are_refused(tmp_path, tiny_net):
    from conftest import TinyNet
    casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8)).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["fc.bias"]
    save_file(state, str(weights))
    with pytest.raises(LoadError, match=r"missing keys \['fc.bias'\]"):
        casify.from_pretrained(tmp_path, model=TinyNet())
    state["fc.bias"] = torch.zeros(5)
    state["fc.weight"] = torch.zeros(5, 3)
    save_file(state, str(weights))
    with pytest.raises(LoadError, match=r"fc.weight: saved \(5, 3\) vs model \(5, 16\)"):
        casify.from_pretrained(tmp_path, model=TinyNet())


def test_bad_locations_are_explained(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        casify.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LoadError, match="is a file"):
        casify.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(LoadError, match="neither a local folder nor a Hub repo id"):
        casify.from_pretrained(str(tmp_path / "does" / "not" / "exist"))
