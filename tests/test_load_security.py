"""A saved model's config.json is data, never a way in: hostile or malformed configs are refused with LoadError,
offline, before anything is downloaded, read from a named path or built."""
import copy
import json
import socket

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import casify
from casify import LoadError
from casify.core.config_validation import MAX_CONFIG_BYTES, validate_config


class NetworkUsed(BaseException):
    """BaseException, so no ``except Exception`` in the code under test can swallow it."""


class ModelBuilt(BaseException):
    pass


def _forbid(kind):
    def refuse(*args, **kwargs):
        raise kind(f"called with {args} {kwargs}")
    return refuse


@pytest.fixture
def offline(monkeypatch):
    """No sockets, no Hub or URL downloads: any attempt fails the test instead of being reported as a LoadError."""
    monkeypatch.setattr(socket.socket, "connect", _forbid(NetworkUsed))
    monkeypatch.setattr(socket, "create_connection", _forbid(NetworkUsed))
    for module, name in [(huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                         (huggingface_hub.file_download, "hf_hub_download"), (torch.hub, "load_state_dict_from_url"),
                         (torch.hub, "download_url_to_file")]:
        monkeypatch.setattr(module, name, _forbid(NetworkUsed))


@pytest.fixture
def no_build(monkeypatch):
    """Hostile configs must be refused before a model is built from them."""
    monkeypatch.setattr(timm, "create_model", _forbid(ModelBuilt))
    monkeypatch.setattr(torchvision.models, "get_model", _forbid(ModelBuilt))


GOOD = {
    "base_model": {"source": "timm", "name": "cifar_resnet18",
                   "kwargs": {"num_classes": 10, "in_chans": 3, "width": 0.0625}},
    "cas": {"layers": ["layer4.0"], "init": "identity", "suppress": True, "num_classes": 10,
            "channel_dims": {"layer4.0": 1}, "channels": {"layer4.0": 32}, "input_size": [3, 32, 32]},
    "normalize": None, "class_names": None, "versions": {"casify": "0.1.0"}, "format": "casify",
}


def _set(path, value):
    def edit(config):
        *keys, last = path.split(".")
        target = config
        for key in keys:
            target = target[key]
        target[last] = value
    return edit


def _drop(path):
    def edit(config):
        *keys, last = path.split(".")
        target = config
        for key in keys:
            target = target[key]
        del target[last]
    return edit


HOSTILE = {  # id: (edit, what the error must name)
    "hub name": (_set("base_model.name", "hf-hub:attacker/evil"), "base_model.name = 'hf-hub:attacker/evil'"),
    "local-dir name": (_set("base_model.name", "local-dir:/etc"), "no 'hf-hub:', 'local-dir:'"),
    "path name": (_set("base_model.name", "../../etc/passwd"), "base_model.name"),
    "unregistered name": (_set("base_model.name", "resnet18_with_a_backdoor"), "registered with timm"),
    "torchvision detection": (lambda c: c["base_model"].update(source="torchvision", name="fasterrcnn_resnet50_fpn",
                                                               kwargs={}), "registered with torchvision"),
    "unknown source": (_set("base_model.source", "torch.hub"), "'timm', 'torchvision' or 'custom'"),
    "checkpoint_path": (_set("base_model.kwargs.checkpoint_path", "/etc/passwd"), "kwargs.checkpoint_path"),
    "pretrained": (_set("base_model.kwargs.pretrained", True), "kwargs.pretrained"),
    "pretrained_cfg_overlay": (_set("base_model.kwargs.pretrained_cfg_overlay", {"file": "/etc/passwd"}),
                               "kwargs.pretrained_cfg_overlay"),
    "pretrained_cfg": (_set("base_model.kwargs.pretrained_cfg", {"url": "https://evil.example/w.pth"}),
                       "kwargs.pretrained_cfg"),
    "weights": (_set("base_model.kwargs.weights", "DEFAULT"), "kwargs.weights"),
    "cache_dir": (_set("base_model.kwargs.cache_dir", "/tmp/x"), "kwargs.cache_dir"),
    "base num_classes 1e12": (_set("base_model.kwargs.num_classes", 10**12), "an integer from 0 to 100000"),
    "base num_classes bool": (_set("base_model.kwargs.num_classes", True), "kwargs.num_classes = True"),
    "base num_classes str": (_set("base_model.kwargs.num_classes", "10"), "kwargs.num_classes = '10'"),
    "in_chans huge": (_set("base_model.kwargs.in_chans", 10**6), "kwargs.in_chans"),
    "width huge": (_set("base_model.kwargs.width", 1e9), "kwargs.width"),
    "global_pool code": (_set("base_model.kwargs.global_pool", "avg; import os"), "kwargs.global_pool"),
    "kwargs not a dict": (_set("base_model.kwargs", ["pretrained"]), "base_model.kwargs"),
    "base_model missing": (_drop("base_model"), "base_model is missing"),
    "cas missing": (_drop("cas"), "cas is missing"),
    "num_classes missing": (_drop("cas.num_classes"), "cas.num_classes is missing"),
    "cas num_classes 1e12": (_set("cas.num_classes", 10**12), "cas.num_classes = 1000000000000"),
    "cas num_classes float": (_set("cas.num_classes", 10.0), "cas.num_classes = 10.0"),
    "cas num_classes NaN": (_set("cas.num_classes", float("nan")), "cas.num_classes = nan"),
    "layers a string": (_set("cas.layers", "layer4.0"), "cas.layers = 'layer4.0'"),
    "layers not str": (_set("cas.layers", [4]), r"cas.layers\[0\] = 4"),
    "layers regex": (_set("cas.layers", ["re:(a+)+$"]), "not a pattern"),
    "too many layers": (_set("cas.layers", [f"l{i}" for i in range(10_000)]), "at most 512"),
    "long layer name": (_set("cas.layers", ["x" * 100_000]), "1 to 256 characters"),
    "duplicate layers": (_set("cas.layers", ["layer4.0", "layer4.0"]), "distinct"),
    "init": (_set("cas.init", "evil"), "cas.init = 'evil'; expected one of \\['identity', 'paper'\\]"),
    "suppress": (_set("cas.suppress", "yes"), "cas.suppress"),
    "channel_dims str": (_set("cas.channel_dims", {"layer4.0": "1"}), "cas.channel_dims.layer4.0 = '1'"),
    "channel_dims key": (_set("cas.channel_dims", {"other": 1}), "keys that are layers"),
    "channels huge": (_set("cas.channels", {"layer4.0": 10**9}), "cas.channels.layer4.0"),
    "input_size huge": (_set("cas.input_size", [3, 10**6, 10**6]), "cas.input_size"),
    "input_size zero": (_set("cas.input_size", [0, 32, 32]), "cas.input_size"),
    "input_size str": (_set("cas.input_size", "3x32x32"), "cas.input_size"),
    "normalize std 0": (_set("normalize", {"mean": [0.5], "std": [0.0]}), "std > 0"),
    "normalize shape": (_set("normalize", {"mean": [0.5, 0.5], "std": [0.2]}), "equal-length"),
    "normalize extra key": (_set("normalize", {"mean": [0.5], "std": [0.2], "eval": "x"}), "normalize"),
    "normalize NaN": (_set("normalize", {"mean": [float("nan")], "std": [0.2]}), "finite numbers"),
    "class_names length": (_set("class_names", ["cat", "dog"]), "a list of 10 strings"),
    "class_names types": (_set("class_names", list(range(10))), "class_names"),
    "metrics": (_set("metrics", "pwned"), "metrics = 'pwned'; expected a JSON object or null"),
    "training": (_set("training", [1, 2]), "training"),
    "checksum": (_set("weights_sha256", "abc"), "weights_sha256"),
    "format": (_drop("format"), "format = None"),
    "not an object": (lambda c: c.clear() or c.update(format="casify", base_model=[1]), "base_model = \\[1\\]"),
}


def _folder(tmp_path, config=None, text=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(text if text is not None else json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_or_malformed_configs_are_refused_offline_before_building(case, tmp_path, offline, no_build):
    edit, message = HOSTILE[case]
    config = copy.deepcopy(GOOD)
    edit(config)
    with pytest.raises(LoadError, match="refused|missing") as info:
        casify.from_pretrained(_folder(tmp_path, config))
    assert __import__("re").search(message, str(info.value)), str(info.value)
    assert "expected" in str(info.value) or "always has it" in str(info.value)  # says what would be right


RAW = {  # id: (config.json text, what the error must say)
    "truncated": (json.dumps(GOOD)[:57], "is not valid JSON"),
    "empty": ("", "is not valid JSON"),
    "a list": ("[1, 2]", "the config = \\[1, 2\\]"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, "nests JSON too deeply|not valid JSON"),
    "huge integer": (json.dumps(GOOD).replace('"num_classes": 10,', '"num_classes": ' + "9" * 5000 + ",", 1),
                     "not valid JSON|refused"),
    "infinity": (json.dumps(GOOD).replace('"width": 0.0625', '"width": Infinity'), "kwargs.width = inf"),
}


@pytest.mark.parametrize("case", list(RAW))
def test_unparseable_configs_are_refused(case, tmp_path, offline, no_build):
    text, message = RAW[case]
    with pytest.raises(LoadError, match=message):
        casify.from_pretrained(_folder(tmp_path, text=text))


def test_non_utf8_and_oversized_configs_are_refused_without_reading_them(tmp_path, offline, no_build):
    folder = _folder(tmp_path)
    (folder / "config.json").write_bytes(b'{"format": "casify\xff"}')
    with pytest.raises(LoadError, match="not UTF-8"):
        casify.from_pretrained(folder)
    with open(folder / "config.json", "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: refused by its size, nothing is read
    with pytest.raises(LoadError, match=f"at most {MAX_CONFIG_BYTES} bytes"):
        casify.from_pretrained(folder)


def test_a_weights_file_that_is_not_safetensors_is_refused_before_building(tmp_path, offline, no_build):
    folder = _folder(tmp_path, GOOD)
    (folder / "model.safetensors").write_bytes(b"\x80\x04 a pickle, or anything else")
    with pytest.raises(LoadError, match="is not a readable safetensors file"):
        casify.from_pretrained(folder)


def test_a_good_config_loads_with_the_network_blocked(tmp_path, offline):
    """The same blocks as above: a real folder still loads, so the refusals are about the configs, not the setup."""
    base = timm.create_model("cifar_resnet18", num_classes=10, width=0.0625)
    wrapped = casify.wrap(base, layers=["layer4.0"])
    wrapped.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in GOOD if k != "versions"} == {k: GOOD[k] for k in GOOD if k != "versions"}
    loaded = casify.from_pretrained(tmp_path)
    wrapped.eval(), loaded.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), wrapped(x), rtol=0, atol=0)


def test_a_hostile_hub_config_is_refused_before_the_weights_are_downloaded(tmp_path, monkeypatch, no_build):
    from test_hub import FakeHub  # huggingface_hub's own snapshot_download, serving this folder without a network
    remote = _folder(tmp_path / "remote", dict(GOOD, base_model={"source": "timm", "name": "hf-hub:attacker/evil"}))
    hub = FakeHub(monkeypatch, tmp_path / "cache", remote, repo_id="someone/model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match="base_model.name = 'hf-hub:attacker/evil'"):
        casify.from_pretrained("someone/model")
    assert hub.downloaded == ["config.json"] and [s["allow_patterns"] for s in hub.snapshots] == [["config.json"]]


def test_a_model_whose_config_would_be_refused_is_not_saved(tmp_path, tiny_net):
    spec = {"source": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}
    model = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), base_spec=spec)
    with pytest.raises(ValueError, match="kwargs.checkpoint_path.*nothing was written"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_base_checks_the_spec_too(no_build):
    from casify.core.spec import build_base
    with pytest.raises(LoadError, match="kwargs.pretrained"):
        build_base({"source": "timm", "name": "resnet18", "kwargs": {"pretrained": True}})


def test_validate_config_keeps_a_good_config_and_drops_nothing_it_reads():
    checked = validate_config(copy.deepcopy(GOOD))
    assert checked["base_model"] == GOOD["base_model"] and checked["cas"]["layers"] == ["layer4.0"]
    assert checked["cas"]["channel_dims"] == {"layer4.0": 1} and checked["normalize"] is None


# -- a model folder is its own files, in the dtype it was saved in ---------------------------------------------------
def _tiny_folder(tmp_path, half=False):
    from conftest import TinyNet
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), ["stem"], input_size=(3, 8, 8), normalize=None)
    if half:
        model = model.half()
    return model, model.save_pretrained(tmp_path / "model")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_symlink_in_a_model_folder_that_points_outside_it_is_refused(tmp_path, name, offline):
    from conftest import TinyNet
    _, folder = _tiny_folder(tmp_path)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(LoadError, match=rf"{name} is a symbolic link to .*elsewhere.*outside the model folder"):
        casify.from_pretrained(folder, model=TinyNet())


def test_links_that_stay_inside_the_folder_load(tmp_path, offline):
    from conftest import TinyNet
    model, folder = _tiny_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "weights-v1.safetensors")
    (folder / "model.safetensors").symlink_to("weights-v1.safetensors")
    (tmp_path / "link-to-folder").symlink_to(folder)  # the folder itself may be a link
    loaded = casify.from_pretrained(tmp_path / "link-to-folder", model=TinyNet())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_a_symlink_to_a_file_outside_is_never_uploaded(tmp_path):
    from casify.io.publish import upload_patterns
    _, folder = _tiny_folder(tmp_path)
    (tmp_path / "secret").write_text("HF_TOKEN=hf_xxx")
    (folder / "README.md").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="README.md is a symbolic link to .*secret, outside"):
        upload_patterns(folder)


def test_weights_load_in_the_dtype_they_were_saved_in_and_another_dtype_is_refused(tmp_path, offline):
    from conftest import TinyNet
    from casify.io.serialization import sha256_file
    from safetensors.torch import load_file
    model, folder = _tiny_folder(tmp_path, half=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["weights_dtype"] == "float16"
    loaded = casify.from_pretrained(folder, model=TinyNet())
    assert loaded.cas_modules.stem.classifier.weight.dtype == torch.float16  # not silently cast to float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the file converted to float32 afterwards (checksum updated too): the config says float16
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, folder / "model.safetensors")
    config["weights_sha256"] = sha256_file(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"holds float32 tensors .* says the weights are float16"):
        casify.from_pretrained(folder, model=TinyNet())
    # a folder that records no dtype (an older casify): float16 weights into the float32 model are not cast silently
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, folder / "model.safetensors")
    del config["weights_dtype"], config["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"as float16 but the model has it as float32 .*cast them silently"):
        casify.from_pretrained(folder, model=TinyNet())
    with pytest.raises(LoadError, match="weights_dtype"):
        validate_config({**GOOD, "weights_dtype": "int8"})
