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

import torch
import yaml

import casify_cli
from casify.recipe import CommandLine, ConfigError, load_recipe, run
from casify.train import RunMismatchError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"


def main(method, argv):
    """``casify train --method METHOD ARGV`` in this process, returning the run's summary (errors raised, not
    printed): the options parsed by the command's own grammar, the recipe read once and run."""
    args = casify_cli.build_parser().parse_args(["train", "--method", method, *argv])
    return run(load_recipe(args.config, CommandLine.from_args(args)))
RUN_NAME_HASH = "c19fc4c7"  # what 0.x versions named the shipped tiny recipe


def load_config(path, overrides=()):
    return load_recipe(path, CommandLine(overrides=tuple(overrides)))


def _run(cmd, tmp_path, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_recipe_script_trains_evaluates_and_writes_a_hub_folder(tmp_path):
    out = tmp_path / "run"
    proc = _run([sys.executable, "recipes/finetune_at.py", "--config", str(TINY), "--output_dir", str(out),
                 "--max_steps", "3", "--set", "eval.max_examples=32"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "at" and summary["cas"] and summary["steps"] == 3
    assert summary["selected"] == "best" and summary["test"]["n"] == 32
    assert {"natural", "pgd20"} <= set(summary["test"]["accuracy"])
    hub = {p.name for p in (out / "hub").iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "eval_report.json", "robustness_curve.png",
            "attacks.png"} <= hub
    assert "![robustness curve](robustness_curve.png)" in (out / "hub" / "README.md").read_text()
    # the run ends with a short table, not the summary's JSON; a log that is not a terminal gets progress lines
    natural = 100 * summary["test"]["accuracy"]["natural"]
    assert f"natural                     {natural:6.2f} %" in proc.stdout and "worst case (every attack)" in proc.stdout
    assert str(out / "best") in proc.stdout and '"accuracy": {' not in proc.stdout
    assert "\r" not in proc.stderr and "at+cas: 3/3 (100%)" in proc.stderr


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
          "--set", "train.batch_size=4", "--set", "train.num_workers=0", "--set", "train.compile=false", "--set", "train.val_max_examples=3",
          "--set", "eval.max_examples=6", "--set", "eval.batch_size=6", "--set", "eval.eps=2/255"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test"]["n"] == 6
    assert summary["test"]["eps"] == pytest.approx(2 / 255)  # the evaluation's own radius, not the training one
    config = json.loads((out / "hub" / "config.json").read_text())
    assert config["cas"]["layers"] == ["layer4.0"] and config["training"]["config"]["mixed_precision"] == "bf16"
    assert config["training"]["config"]["eps"] == pytest.approx(4 / 255)


def test_bad_recipe_settings_are_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting train\.epoch; did you mean 'epochs'"):
        load_config(str(TINY), ["train.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {name: resnet18}\n")
    with pytest.raises(ValueError, match="unknown sections \\['modle'\\]; did you mean 'model'"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(str(TINY), ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown setting 'trian'; did you mean 'train'"):
        load_config(str(TINY), ["trian.lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown setting model\.cas_layer; did you mean 'cas_layers'"):
        load_config(str(TINY), ["model.cas_layer=layer4"])
    with pytest.raises(ConfigError, match=r"train\.lr must be a float"):
        load_config(str(TINY), ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"eval\.max_examples must be a int"):
        load_config(str(TINY), ["eval.max_examples=all"])
    recipe = load_config(str(TINY), ["train.eps=8/255", "train.attack_alpha=2/255"])
    assert recipe.train.eps == recipe.attack.eps == recipe.eval.eps == pytest.approx(8 / 255)
    assert recipe.attack.alpha == pytest.approx(2 / 255)


def test_push_without_a_repo_id_fails_before_training(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="--hub_model_id"):
        main("at", ["--config", str(TINY), "--output_dir", str(out), "--push_to_hub"])
    assert not out.exists()


def _tiny_run(out, *extra, method="at"):
    return main(method, ["--config", str(TINY), "--output_dir", str(out), "--max_steps", "2",
                         "--set", "eval.max_examples=8", "--set", "train.val_max_examples=16",
                         "--set", f"method={method}", "--set", "train.progress=false", *extra])


def test_same_seed_gives_bit_identical_weights_and_other_runs_are_refused(tmp_path, one_thread):
    torch.manual_seed(1)
    _tiny_run(tmp_path / "a")
    torch.manual_seed(2)  # the model is built after the seed is set: the global RNG before the run does not matter
    _tiny_run(tmp_path / "b")
    a = (tmp_path / "a" / "final" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "final" / "model.safetensors").read_bytes()
    # TRADES into the AT run's folder would "resume" the finished AT run and publish its weights as TRADES
    with pytest.raises(RunMismatchError, match="train.method: 'at' in the folder's run, 'trades' now"):
        _tiny_run(tmp_path / "a", method="trades")
    with pytest.raises(RunMismatchError, match="train.lr"):
        _tiny_run(tmp_path / "a", "--set", "train.lr=0.5")
    assert (tmp_path / "a" / "final" / "model.safetensors").read_bytes() == a


def test_default_output_folder_is_named_after_the_run():
    name = load_config(str(TINY)).output_dir
    assert name.startswith("outputs/at-cas-cifar_resnet18-digits-s0-")
    assert load_config(str(TINY), ["train.lr=0.2"]).output_dir != name
    assert load_config(str(TINY), ["method=trades"]).output_dir.startswith("outputs/trades-cas-")
    # the name of earlier versions (the hash of the settings as written): a rerun resumes the folder it wrote
    assert name == "outputs/at-cas-cifar_resnet18-digits-s0-" + RUN_NAME_HASH


def test_a_recipe_of_only_a_model_name_types_to_the_sections_own_defaults(tmp_path):
    """The YAML's defaults are read off the typed sections (one schema): a recipe that sets nothing but the model's
    name reads back as each section's dataclass defaults, and every YAML setting is a typed field."""
    import dataclasses
    from casify.recipe.config import DEFAULTS, DataSection, DefenseSection, EvalSection, HubSection, ModelSection
    path = tmp_path / "minimal.yaml"
    path.write_text("model: {name: cifar_resnet18}\n")
    recipe = load_config(str(path))
    assert recipe.model == ModelSection(name="cifar_resnet18")
    assert (recipe.defense, recipe.data, recipe.hub) == (DefenseSection(), DataSection(), HubSection())
    assert recipe.eval == EvalSection(eps=recipe.train.eps, seed=recipe.train.seed)
    assert (recipe.resume, recipe.overwrite) == (True, False)
    names = lambda section: {f.name for f in dataclasses.fields(section)}
    assert set(DEFAULTS["model"]) == names(ModelSection) | {"defense", "defense_options", "defense_layer_options"}
    assert set(DEFAULTS["eval"]) == names(EvalSection) - {"seed"}


def _generated_npz(path: Path, num_classes=10, size=32):
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(48) % num_classes, np.arange(8) % num_classes
    images = lambda y: (rng.random((len(y), size, size, 3)) * 60 + (200 / num_classes) * y[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_runs_a_step_on_generated_data(tmp_path, config, monkeypatch, one_thread):
    """Each config as shipped (model, CAS layers, init, method, loss, attack), one step on generated data: nothing
    downloaded (pretrained weights off), nothing large (batch 4, two validation and two test images: the suite's
    attacks on them are most of the test's time, and the full evaluation is tested elsewhere; float32: bf16 on a CPU is
    slow, and the ImageNet test above runs it; eager: inductor's CPU compile of a ResNet-152 takes minutes, and
    tests/test_compile_switches.py covers train.compile). In this process, through what ``recipes/finetune_<method>.py``
    runs (``casify_cli.main(["train", "--method", method, ...])``), from the repository root with the scripts'
    environment: the scripts themselves run as subprocesses above, and a fresh interpreter per config would spend
    most of the test importing torch and timm."""
    from casify_cli import main as cli_main
    method = yaml.safe_load(config.read_text())["method"]
    data = ["--set", f"data.name={_generated_npz(tmp_path / 'data.npz')}", "--set", "data.val_size=8"]
    if config.stem.startswith("imagenet"):
        _tiny_imagefolder(tmp_path / "imagenet")
        data = ["--set", f"data.name=imagefolder:{tmp_path / 'imagenet'}", "--set", "data.image_size=32",
                "--set", "data.val_size=3",
                # the folder has 3 classes: a 1000-class model on it is refused (casify.data.data_fit)
                "--set", "model.kwargs={num_classes: 3}"]
    elif config.stem.startswith("digits"):
        data = []
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    for key, value in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                       "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}.items():
        monkeypatch.setenv(key, value)
    assert cli_main(["train", "--method", method, "--config", str(config), "--output_dir", str(out),
                     "--max_steps", "1", "--set", "model.pretrained=false", *data, "--set", "train.batch_size=4",
                     "--set", "train.num_workers=0", "--set", "train.val_max_examples=2",
                     "--set", "eval.max_examples=2", "--set", "eval.batch_size=4", "--set", "eval.suite=quick",
                     "--set", "train.progress=false", "--set", "train.mixed_precision=no",
                     "--set", "train.compile=false"]) in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["method"] == method and summary["test"]["n"] == 2


def test_every_recipe_script_is_the_train_command_with_its_method(tmp_path):
    """The configs above run in this process through what each ``recipes/finetune_<method>.py`` runs; here every
    script a config names runs as a user runs it (``--help`` answers without importing torch) and passes its method."""
    methods = sorted({yaml.safe_load(c.read_text())["method"] for c in CONFIGS})
    assert methods == ["at", "mart", "trades"]
    for method in methods:
        script = ROOT / "recipes" / f"finetune_{method}.py"
        assert f'main(["train", "--method", "{method}", *sys.argv[1:]])' in script.read_text(), script.name
        proc = _run([sys.executable, str(script.relative_to(ROOT)), "--help"], tmp_path)
        assert "--config" in proc.stdout and "--max-steps" in proc.stdout


@pytest.mark.parametrize("defense", ["cifs", "fsr"])
def test_a_recipe_trains_any_registered_defense(tmp_path, one_thread, defense):
    out = tmp_path / defense
    _tiny_run(out, "--set", f"model.defense={defense}")
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["defense"]["name"] == defense
    with pytest.raises(ConfigError, match="model.defense"):
        load_config(str(TINY), ["model.defense=nope"])
    with pytest.raises(ConfigError, match="no option"):
        load_config(str(TINY), [f"model.defense={defense}", "model.defense_options={bogus: 1}"])


def test_a_run_folder_written_before_the_typed_recipe_is_the_same_run(tmp_path, one_thread):
    """The identity a run folder recorded at a3c8f91 (before recipes were typed) is the one the typed recipe gives the
    same command: such a folder resumes instead of being refused as another run."""
    from casify.recipe import build_datasets, build_model
    from casify.train import Trainer
    from casify.train.checkpoints import current_names, record_differences

    recorded = json.loads((ROOT / "tests" / "fixtures" / "run_identity_a3c8f91.json").read_text())["identity"]
    assert recorded["model"]["class"] == "CASModel"  # 0.1.0's name of the wrapped model, read as today's on resume
    recorded = current_names(recorded)
    recipe = load_recipe(str(TINY), CommandLine(overrides=["eval.max_examples=8", "train.val_max_examples=16",
                                                           "train.progress=false"],
                                                output_dir=str(tmp_path / "run"), max_steps=1))
    torch.manual_seed(recipe.train.seed)  # the run's seed, set before the model is built (as run() does)
    model = build_model(recipe.model, recipe.defense)
    train_set, val_set, _ = build_datasets(recipe.data)
    trainer = Trainer(model, train_set, val_set, recipe.train, identity=recipe.identity())
    assert record_differences(recorded, trainer.identity) == []
    changed = load_recipe(str(TINY), CommandLine(overrides=["model.defense_options={}", "data.augment=false"]))
    assert record_differences(recorded["recipe"], changed.identity()["recipe"]) == [
        "data.augment: True in the folder's run, False now"]


def test_a_recipe_copy_whose_method_or_output_dir_disagrees_with_train_is_refused(tmp_path):
    """Recipe.method / output_dir are train's: a copy that changes one side only would train one thing and record
    another, so it is refused; replacing both together is the way."""
    import dataclasses
    recipe = load_recipe(str(TINY))
    with pytest.raises(ValueError, match="must equal train's"):
        dataclasses.replace(recipe, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="must equal train's"):
        dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, method="trades"))
    moved = dataclasses.replace(recipe, output_dir=str(tmp_path),
                                train=dataclasses.replace(recipe.train, output_dir=str(tmp_path)))
    assert moved.output_dir == moved.train.output_dir == str(tmp_path)


@pytest.mark.parametrize("attack", ["fgsm", "fgsm_rs", "n_fgsm"])
def test_each_single_step_training_attack_runs_a_recipe_step(tmp_path, one_thread, attack):
    """train.attack as a user sets it: one step of the tiny AT+CAS recipe (the defended arm: the attack runs on the
    adaptive objective), recorded in run_config.json's identity, the saved model's training record and its card."""
    out = tmp_path / attack
    main("at", ["--config", str(TINY), "--output_dir", str(out), "--max_steps", "1", "--set", f"train.attack={attack}",
                "--set", "train.attack_steps=1", "--set", "train.attack_alpha=null", "--set", "eval.max_examples=4",
                "--set", "train.val_max_examples=8", "--set", "train.progress=false"])
    run = json.loads((out / "run_config.json").read_text())
    assert run["identity"]["train"]["attack"] == attack and run["attack"]["kind"] == attack
    assert run["attack"]["objective"] == "cas" and run["attack"]["steps"] == 1
    assert run["attack"]["alpha"] == pytest.approx((1.25 if attack == "fgsm_rs" else 1.0) * 8 / 255)
    assert "val_fgsm" in json.loads((out / "summary.json").read_text())["validation"][0]
    training = json.loads((out / "final" / "config.json").read_text())["training"]
    assert training["attack"]["kind"] == attack and training["config"]["attack"] == attack
    card = (out / "hub" / "README.md").read_text()
    assert "**Training attack:** " + {"fgsm": "FGSM (no random start)", "fgsm_rs": "FGSM with a random start",
                                      "n_fgsm": "N-FGSM"}[attack] in card


def test_bad_training_attack_settings_are_refused():
    with pytest.raises(ConfigError, match=r"train.attack 'n-fgsm' is not a training attack; did you mean 'n_fgsm'\?"):
        load_config(str(TINY), ["train.attack=n-fgsm"])
    # the tiny recipe writes attack_steps: 2 -- a single-step attack refuses it instead of ignoring it
    with pytest.raises(ConfigError, match=r"single-step attack but train.attack_steps is 2: set attack_steps to 1"):
        load_config(str(TINY), ["train.attack=fgsm_rs"])
    recipe = load_config(str(TINY), ["train.attack=n_fgsm", "train.attack_steps=1"])
    assert recipe.train.attack == "n_fgsm" and recipe.attack.steps == 1
