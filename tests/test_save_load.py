"""save_pretrained / from_pretrained: identical outputs after a round trip, strict keys, clear errors, no pickles."""
import hashlib
import json
import time

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
    # hf_hub_id is timm's pretrained-config repo, recorded for the model card only
    assert config["base_model"] == {"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 3},
                                    "hf_hub_id": timm.create_model("resnet18").pretrained_cfg["hf_hub_id"]}
    assert config["weights_sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
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
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]  # a folder without a checksum: the key and shape checks still hold
    (tmp_path / "config.json").write_text(json.dumps(config))
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


def _no_hub(monkeypatch, tmp_path):
    """huggingface_hub's own snapshot_download with the network off (an empty cache, a ConnectError for every Hub
    call); its calls are recorded."""
    from test_hub import FakeHub
    return FakeHub(monkeypatch, tmp_path / "hf-cache", remote=None).snapshots


def test_a_mistyped_local_path_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    calls = _no_hub(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.perf_counter()
    for typo in ("runs/bset", "./runs/best", "runs/best/model", "~/no-such-casify-folder-xyz/m"):
        with pytest.raises(LoadError, match="no folder at"):
            casify.from_pretrained(typo)
    with pytest.raises(LoadError, match=r"no folder at 'runs/bset'.*Hub repo 'runs/bset'.*snapshot_download"):
        casify.from_pretrained("runs/bset")
    with pytest.raises(LoadError, match="pass it as a string"):
        casify.from_pretrained(tmp_path.__class__("user/name"))
    assert calls == [] and time.perf_counter() - start < 5


def test_a_repo_id_that_is_not_local_tries_the_hub_and_says_both(tmp_path, monkeypatch):
    calls = _no_hub(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match=r"no local folder 'user/name'.*Hub repo 'user/name' could not be read.*"
                                        r"LocalEntryNotFoundError: .*ConnectError: network is off"):
        casify.from_pretrained("user/name")
    # only config.json is asked for: the weights never are
    assert [(c["repo_id"], c["allow_patterns"], c["local_files_only"]) for c in calls] == [
        ("user/name", ["config.json"], False)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="no local folder 'user/name'.*HF_HUB_OFFLINE is set.*LocalEntryNotFoundError"):
        casify.from_pretrained("user/name")
    assert calls[-1]["local_files_only"] is True  # offline: only the local Hub cache, no retries


def _saved_tiny(tmp_path, tiny_net):
    wrapped = _trained_like(casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None))
    wrapped.save_pretrained(tmp_path)
    return wrapped


def test_a_flipped_byte_in_the_weights_is_detected(tmp_path, tiny_net):
    from conftest import TinyNet
    _saved_tiny(tmp_path, tiny_net)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: still a valid safetensors file, just different numbers
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # loads without complaint on its own
    with pytest.raises(LoadError, match=r"model.safetensors was modified or corrupted.*SHA-256"):
        casify.from_pretrained(tmp_path, model=TinyNet())


def test_a_folder_saved_before_checksums_still_loads(tmp_path, tiny_net):
    """Today's format minus weights_sha256 (what casify 0.1.0 wrote) loads and gives the same outputs."""
    from conftest import TinyNet
    wrapped = _saved_tiny(tmp_path, tiny_net)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    loaded = casify.from_pretrained(tmp_path, model=TinyNet())
    wrapped.eval(), loaded.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


OLD_CONFIG = {  # written by casify 0.1.0 for timm.create_model("cifar_resnet18", num_classes=10, width=0.0625)
    "base_model": {"source": "timm", "name": "cifar_resnet18",
                   "kwargs": {"num_classes": 10, "in_chans": 3, "width": 0.0625}},
    "cas": {"layers": ["layer4.0"], "init": "identity", "suppress": True, "num_classes": 10,
            "channel_dims": {"layer4.0": 1}, "channels": {"layer4.0": 32}, "input_size": [3, 32, 32]},
    "normalize": None, "class_names": None,
    "versions": {"casify": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.31", "python": "3.11.7"},
    "format": "casify",
}


def test_an_old_format_timm_folder_loads(tmp_path):
    base = _trained_like(timm.create_model("cifar_resnet18", num_classes=10, width=0.0625))
    wrapped = casify.wrap(base, layers=["layer4.0"])
    save_file({k: v.contiguous() for k, v in wrapped.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG, indent=2))
    loaded = casify.from_pretrained(tmp_path)
    wrapped.eval(), loaded.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


def test_a_config_that_disagrees_with_the_weights_is_refused_before_building(tmp_path, monkeypatch):
    """Sizes inflated in config.json are refused from the safetensors header, before a model is allocated."""
    base = timm.create_model("cifar_resnet18", num_classes=10, width=0.0625)
    casify.wrap(base, layers=["layer4.0"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    built = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(torch.empty(0).device) or real(*a, **k))

    config["base_model"]["kwargs"]["num_classes"] = 90_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"does not match the architecture.*linear.weight: saved \(10, 32\) vs model "
                                        r"\(90000, 32\)"):
        casify.from_pretrained(tmp_path)
    assert built and all(d.type == "meta" for d in built)  # only ever built on the meta device: no memory

    config["cas"]["num_classes"] = 90_000
    (tmp_path / "config.json").write_text(json.dumps(config))
    built.clear()
    with pytest.raises(LoadError, match=r"classifier.weight: saved \(10, 32\) vs cas.num_classes = 90000"):
        casify.from_pretrained(tmp_path)
    assert built == []

    # more CAS layers than the weights hold (each would allocate channels x classes): refused after a meta wrap
    config["base_model"]["kwargs"]["num_classes"] = config["cas"]["num_classes"] = 10
    config["cas"]["layers"] = ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    built.clear()
    with pytest.raises(LoadError, match=r"missing keys \['cas_modules.layer1_0.classifier.bias'"):
        casify.from_pretrained(tmp_path)
    assert built and all(d.type == "meta" for d in built)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_honour_the_users_umask(tiny_net, tmp_path, umask):
    import os
    import stat
    previous = os.umask(umask)
    try:
        casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None).save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
