"""The recipes run as a user runs them: as scripts, under `accelerate launch` with two processes, and the ImageNet
config on a tiny generated image folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from casify.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"


def _run(cmd, tmp_path, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_recipe_script_trains_evaluates_and_writes_a_hub_folder(tmp_path):
    out = tmp_path / "run"
    _run([sys.executable, "recipes/finetune_at.py", "--config", str(TINY), "--output_dir", str(out),
          "--max_steps", "3", "--set", "eval.max_examples=32"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "at" and summary["cas"] and summary["steps"] == 3
    assert summary["selected"] == "best" and summary["test"]["n"] == 32
    assert {"natural", "pgd20"} <= set(summary["test"]["accuracy"])
    assert {"README.md", "config.json", "model.safetensors", "eval_report.json"} <= {p.name for p in (out / "hub").iterdir()}


def test_accelerate_launch_two_processes_gathers_metrics(tmp_path):
    out = tmp_path / "ddp"
    # on a machine without GPUs, --multi_gpu starts the processes with torchrun and casify runs them on gloo
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/finetune_trades.py", "--config", str(TINY),
          "--set", "method=trades", "--output_dir", str(out), "--max_steps", "2",
          "--set", "train.val_max_examples=40", "--set", "eval.max_examples=30", "--set", "train.batch_size=16"],
         tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run_config.json").read_text())
    assert run["num_processes"] == 2 and summary["method"] == "trades"
    # validation and test metrics are gathered over both processes: every held-out example is counted once
    assert summary["validation"][-1]["val_count"] == 40
    assert summary["test"]["n"] == 30


def _tiny_imagefolder(root: Path, classes=3, per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (rng.random((40, 48, 3)) * 80 + 60 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")


def test_imagenet_recipe_runs_two_steps_on_a_tiny_image_folder(tmp_path):
    data = tmp_path / "imagenet"
    _tiny_imagefolder(data)
    out = tmp_path / "in"
    config = ROOT / "recipes" / "configs" / "imagenet_resnet152_at_cas.yaml"
    _run([sys.executable, "recipes/finetune_at.py", "--config", str(config), "--output_dir", str(out),
          "--max_steps", "2",
          # a small model instead of ResNet-152, nothing downloaded; everything else is the ImageNet recipe
          "--set", "model.name=resnet10t", "--set", "model.pretrained=false", "--set", "model.kwargs={num_classes: 3}",
          "--set", f"data.name=imagefolder:{data}", "--set", "data.image_size=32", "--set", "data.val_size=3",
          "--set", "train.batch_size=4", "--set", "train.num_workers=0", "--set", "train.val_max_examples=3",
          "--set", "eval.max_examples=6", "--set", "eval.batch_size=6"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test"]["n"] == 6
    config = json.loads((out / "hub" / "config.json").read_text())
    assert config["cas"]["layers"] == ["layer4.0"] and config["training"]["config"]["mixed_precision"] == "bf16"
    assert config["training"]["config"]["eps"] == pytest.approx(4 / 255)


def test_bad_recipe_settings_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown train settings \\['epoch'\\]"):
        load_config(str(TINY), ["train.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {name: resnet18}\n")
    with pytest.raises(ValueError, match="unknown sections \\['modle'\\]"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(str(TINY), ["train.epochs"])
