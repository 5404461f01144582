"""A pretrained checkpoint loads into a task-sized timm model the timm way: every backbone tensor kept, only a
classifier of another class count re-initialised and named; a checkpoint that does not fit is refused before
anything is built. A tiny generated timm checkpoint stands in for ImageNet weights (offline)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from casify.model.pretrained_weights import CheckpointError, build_named_base, create_timm_from_checkpoint
from casify.recipe import CommandLine, ConfigError, build_base_model, load_recipe, run
from casify.recipe.config import ModelSection

ROOT = Path(__file__).resolve().parents[1]
LITE0 = ROOT / "recipes" / "configs" / "cifar10_efficientnet_lite0_at.yaml"


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """A 1000-class test_efficientnet checkpoint under timm's names (what the shared Lite0 file is, in small)."""
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()
             if not k.endswith("num_batches_tracked")}  # as checkpoints saved without torch's metadata omit them
    path = tmp_path_factory.mktemp("ckpt") / "test_efficientnet_in1k.safetensors"
    save_file(state, str(path))
    return path, state


def test_backbone_kept_classifier_reinitialised_and_named(imagenet_like, capsys):
    path, state = imagenet_like
    model, loaded = create_timm_from_checkpoint("test_efficientnet", path, num_classes=10)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier."))
    assert model.classifier.weight.shape[0] == 10
    assert not model.classifier.weight.any() and not model.classifier.bias.any()  # head_init="zero": logits start at 0
    timm_init, loaded_timm = create_timm_from_checkpoint("test_efficientnet", path, num_classes=10, head_init="timm")
    assert timm_init.classifier.weight.abs().sum() > 0 and loaded_timm.head_init == "timm"
    assert "starts at zero" in loaded.describe() and "starts at zero" not in loaded_timm.describe()
    with pytest.raises(CheckpointError, match="head_init must be one of"):
        create_timm_from_checkpoint("test_efficientnet", path, num_classes=10, head_init="xavier")
    assert set(loaded.dropped) == {"classifier.weight", "classifier.bias"}
    assert loaded.dropped["classifier.weight"][0] == 1000 and loaded.num_classes == 10
    assert model.pretrained_cfg["mean"] == timm.create_model("test_efficientnet").pretrained_cfg["mean"]
    # the recipe's path says it in one line
    build_base_model(ModelSection(name="test_efficientnet", checkpoint=str(path), kwargs={"num_classes": 10}))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "re-initialised the classifier for 10 classes" in err[0] and "(1000," in err[0]
    # same class count: the classifier is loaded too, nothing dropped
    same, loaded = create_timm_from_checkpoint("test_efficientnet", path)
    assert not loaded.dropped and torch.equal(same.classifier.weight, state["classifier.weight"])


def test_the_named_base_credits_its_weights_to_where_they_came_from(imagenet_like, tmp_path, monkeypatch):
    """The spec a saved card reads: a checkpoint's file and SHA-256, never timm's Hub repo for weights that did not
    come from it; a torchvision checkpoint loads strictly or is refused."""
    import torchvision
    path, _ = imagenet_like
    from_file = build_named_base("test_efficientnet", checkpoint=str(path), num_classes=10)
    assert from_file.spec["pretrained_weights"] == {"file": path.name,
                                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert "hf_hub_id" not in from_file.spec and from_file.loaded.dropped
    assert timm.create_model("resnet18").pretrained_cfg.get("hf_hub_id")  # timm names a repo even without weights
    fresh = build_named_base("resnet18", num_classes=10)
    assert "hf_hub_id" not in fresh.spec and fresh.loaded is None and fresh.spec["name"] == "resnet18"
    torch.manual_seed(2)
    saved = torchvision.models.resnet18(num_classes=10)
    tv_path = tmp_path / "resnet18_task.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tv_path))
    tv = build_named_base("torchvision:resnet18", checkpoint=str(tv_path), num_classes=10)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in tv.model.state_dict().items())
    assert tv.spec["source"] == "torchvision" and tv.spec["pretrained_weights"]["file"] == tv_path.name
    assert tv.loaded.num_classes == 10 and not tv.loaded.dropped
    # asking for pretrained weights beside a checkpoint: the checkpoint's weights, credited to the file, no download
    import torchvision.models._api as tv_weights

    def no_download(*args, **kwargs):
        raise AssertionError("a checkpoint was given: nothing may be downloaded")
    monkeypatch.setattr(tv_weights, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    both = build_named_base("torchvision:resnet18", pretrained=True,  # offline-ok: downloads fail above
                            checkpoint=str(tv_path), num_classes=10)
    assert torch.equal(both.model.fc.weight, saved.fc.weight) and "pretrained_weights" in both.spec
    with pytest.raises(CheckpointError, match="does not fit"):
        build_named_base("torchvision:resnet18", checkpoint=str(tv_path), num_classes=5)
    with pytest.raises(ValueError, match="model.name is required"):
        build_named_base("", checkpoint=str(tv_path))


def test_checkpoints_that_do_not_fit_are_refused_naming_the_first_mismatches(imagenet_like, tmp_path):
    path, state = imagenet_like
    missing = dict(state)
    del missing["conv_stem.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 of the model's tensors \(conv_stem.weight\)"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "missing.safetensors", num_classes=10)
    extra = {**state, "head.extra": torch.zeros(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensors the model does not have \(head.extra\)"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "extra.safetensors", num_classes=10)
    other = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    save_file(other, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit test_efficientnet's backbone: missing"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "resnet.safetensors", num_classes=10)
    with pytest.raises(CheckpointError, match="does not exist"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("weights")
    with pytest.raises(CheckpointError, match="not a weights file"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "notes.txt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot be read as a safetensors file"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="not a timm architecture"):
        create_timm_from_checkpoint("no_such_net", path)


def _tiny_cifar(folder: Path, n: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = (rng.random((n, 32, 32, 3)) * 60 + 18 * y[:, None, None, None]).clip(0, 255).astype(np.uint8)
    path = folder / f"cifar_like_{n}.npz"
    np.savez(path, x=x, y=y)
    return path


def _lite0_sets(ckpt, train_npz, test_npz, *extra):
    return ["model.name=test_efficientnet", f"model.checkpoint={ckpt}", f"data.name={train_npz}",
            f"data.test={test_npz}", "data.val_size=20", "train.batch_size=8", "train.val_max_examples=16",
            "eval.max_examples=8", "eval.suite=quick", *extra]


def test_lite0_recipe_runs_one_step_from_a_generated_checkpoint(imagenet_like, tmp_path):
    """The shipped EfficientNet-Lite0 recipe, with another timm architecture and its weights swapped in by --set."""
    ckpt, _ = imagenet_like
    train, test = _tiny_cifar(tmp_path, 60), _tiny_cifar(tmp_path, 12)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")}
    proc = subprocess.run([sys.executable, "-m", "casify_cli", "train", "--config", str(LITE0),
                           *[a for s in _lite0_sets(ckpt, train, test) for a in ("--set", s)],
                           "--output_dir", str(out), "--max_steps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "re-initialised the classifier for 10 classes" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["test"]["n"] == 8
    assert summary["code"]["casify_version"] and "commit" in summary["code"]
    record = json.loads((out / "run_config.json").read_text())
    assert record["code"] == summary["code"]
    config = json.loads((out / "hub" / "config.json").read_text())
    assert config["base_model"]["name"] == "test_efficientnet" and config["training"]["code"] == summary["code"]
    digest = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert config["base_model"]["pretrained_weights"] == {"file": Path(ckpt).name, "sha256": digest}
    card = (out / "hub" / "README.md").read_text()
    assert f"pretrained weights `{Path(ckpt).name}` (SHA-256 `{digest}`)" in card


def test_a_class_count_the_data_does_not_have_is_refused_before_training(imagenet_like, tmp_path):
    ckpt, _ = imagenet_like
    train, test = _tiny_cifar(tmp_path, 60, classes=10), _tiny_cifar(tmp_path, 12)
    out = tmp_path / "run"
    sets = _lite0_sets(ckpt, train, test, "model.kwargs.num_classes=7")
    recipe = load_recipe(str(LITE0), CommandLine(overrides=tuple(sets), output_dir=str(out), max_steps=1))
    with pytest.raises(ConfigError, match="the model has 7 classes but .* has 10; set --set model.kwargs.num_classes=10"):
        run(recipe)
    assert not (out / "checkpoints").exists()


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_a_checkpoint_never_runs_and_any_file_name_is_recorded(imagenet_like, tmp_path):
    _, state = imagenet_like
    marker = tmp_path / "ran"
    torch.save({"state_dict": dict(state), "payload": _Planted(marker)}, tmp_path / "hostile.pth")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch state dict"):
        create_timm_from_checkpoint("test_efficientnet", tmp_path / "hostile.pth", num_classes=10)
    assert not marker.exists()
    # a file name with spaces and brackets is recorded on the card, and the saved folder still loads
    odd = tmp_path / "my weights (v2).safetensors"
    save_file(state, str(odd))
    from casify.recipe import build_model
    model = build_model(ModelSection(name="test_efficientnet", checkpoint=str(odd), kwargs={"num_classes": 10},
                                     cas_layers=[], input_size=[3, 32, 32]))
    model.save_pretrained(tmp_path / "saved")
    import casify
    loaded = casify.from_pretrained(tmp_path / "saved")
    assert loaded.casify_config["base_model"]["pretrained_weights"]["file"] == odd.name
