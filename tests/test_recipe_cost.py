"""benchmarks/recipe_cost.py: the recipe's own step measured through the Trainer, and the run's device-hours from it.

No timing is asserted (speed is the benchmark's to report); the tests check that the script runs a shipped recipe end
to end on CPU and that its estimate is the recipe's schedule multiplied out."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from casify.recipe import load_config
from casify.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "recipe_cost.py"


def load_script():
    spec = importlib.util.spec_from_file_location("recipe_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_imagenet_estimate_is_the_recipes_schedule_multiplied_out():
    config = load_config(str(ROOT / "recipes/configs/imagenet_resnet152_at_cas.yaml"))
    train = TrainConfig(method=config["method"], **config["train"])
    estimate = load_script().run_estimate(train, images_per_s=100.0, val_s_per_example=0.05,
                                          train_images=1_281_167, held_out=10_000, num_devices=8)
    steps_per_epoch = (1_281_167 - 10_000) // (64 * 8)  # batch 64 per device, drop_last
    assert estimate["steps_per_epoch"] == steps_per_epoch == 2482
    assert estimate["total_steps"] == 10 * steps_per_epoch
    assert estimate["train_device_hours"] == pytest.approx(10 * steps_per_epoch * 512 / 100.0 / 3600)
    assert estimate["validations"] == 10 * steps_per_epoch // 2500 + 1  # every 2,500 steps and at the end
    assert estimate["validation_device_hours"] == pytest.approx(estimate["validations"] * 2000 * 0.05 / 3600)
    assert estimate["wall_hours_at_linear_scaling"] == pytest.approx(estimate["device_hours"] / 8)


def test_the_script_measures_a_shipped_recipe_through_the_trainer(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--recipe", str(ROOT / "recipes/configs/digits_tiny_at_cas.yaml"),
           "--variants", "eager", "eager_channels_last", "--warmup", "1", "--steps", "2", "--rounds", "1",
           "--train-images", "1000", "--devices", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "recipe_cost_digits_tiny_at_cas_cpu.json").read_text())
    assert set(result["variants"]) == {"eager", "eager_channels_last"}
    eager = result["variants"]["eager"]
    assert (eager["compile"], eager["channels_last"]) == (False, False)
    assert result["variants"]["eager_channels_last"]["channels_last"] is True
    assert eager["batch_per_device"] == 32 and eager["attack_steps"] == 2  # the recipe's own settings
    assert eager["images_per_s"]["median"] > 0 and len(eager["images_per_s_by_round"]) == 1
    assert result["estimate_variant"] == "eager_channels_last"
    estimate = result["estimate"]
    rate = result["variants"]["eager_channels_last"]["images_per_s"]["median"]
    assert estimate["global_batch"] == 64 and estimate["steps_per_epoch"] == 1000 // 64
    assert estimate["train_device_hours"] == pytest.approx(estimate["total_steps"] * 64 / rate / 3600)
    assert "speedups" in result and "eager_channels_last / eager" in result["speedups"]
    assert (tmp_path / "recipe_cost_digits_tiny_at_cas_cpu.md").read_text().startswith("# Recipe cost")
