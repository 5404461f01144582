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

from casify.recipe import load_recipe
from casify.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "recipe_cost.py"


def load_script():
    spec = importlib.util.spec_from_file_location("recipe_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_imagenet_estimate_is_the_recipes_schedule_multiplied_out():
    train = load_recipe(str(ROOT / "recipes/configs/imagenet_resnet152_at_cas.yaml")).train
    estimate = load_script().run_estimate(train, images_per_s=100.0, val_s_per_example=0.05,
                                          train_images=1_281_167, held_out=10_000, num_devices=8)
    steps_per_epoch = (1_281_167 - 10_000) // (64 * 8)  # batch 64 per device, drop_last
    assert estimate["steps_per_epoch"] == steps_per_epoch == 2482
    assert estimate["total_steps"] == 10 * steps_per_epoch
    assert estimate["train_device_hours"] == pytest.approx(10 * steps_per_epoch * 512 / 100.0 / 3600)
    assert estimate["validations"] == 10 * steps_per_epoch // 2500 + 1  # every 2,500 steps and at the end
    assert estimate["validation_examples"] == 2000  # val_max_examples of the 10,000 held out
    assert estimate["validation_device_hours"] == pytest.approx(estimate["validations"] * 2000 * 0.05 / 3600)
    assert estimate["wall_hours_at_linear_scaling"] == pytest.approx(estimate["device_hours"] / 8)


@pytest.mark.parametrize("total,per_epoch,every,held_out,expected", [
    (100, 50, None, 10, 2),    # at each epoch's end; the last step is one of them
    (120, 50, None, 10, 3),    # two epoch ends and the last step
    (100, 50, 25, 10, 4),      # every 25 steps; the last step is one of them
    (101, 50, 25, 10, 5),      # ... and the last step on its own
    (100, 50, None, 0, 0),     # no held-out split: no validation
])
def test_validation_count_follows_the_trainer(total, per_epoch, every, held_out, expected):
    assert load_script().validation_count(total, per_epoch, every, held_out) == expected


def test_validation_examples_default_to_the_whole_held_out_split():
    train = TrainConfig(method="at", epochs=1, batch_size=10, val_max_examples=None)
    estimate = load_script().run_estimate(train, images_per_s=10.0, val_s_per_example=1.0, train_images=1000,
                                          held_out=100, num_devices=1)
    assert estimate["validation_examples"] == 100 and estimate["validations"] == 1
    assert estimate["validation_device_hours"] == pytest.approx(100 / 3600)


def test_the_script_measures_a_shipped_recipe_through_the_trainer(tmp_path):
    # CPU only: on a machine with a GPU the script would measure it (and name its files ..._cuda)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
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
