"""The ``casify`` command as a newcomer meets it: fast help, one spelling rule, short errors, its subcommands, and
evaluating models that are not casify folders (shared weights files, ``--arch``)."""
import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import casify
import casify_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_and_version_import_no_torch():
    code = textwrap.dedent("""
        import sys, casify_cli
        for argv in (["--help"], ["eval", "--help"], ["train", "--help"], ["--version"]):
            try:
                casify_cli.main(argv)
            except SystemExit:
                pass
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO-TORCH")
    assert f"casify {casify.__version__}" in done.stdout
    for command in ("train", "eval", "analyze", "layers", "push"):
        assert command in done.stdout


def _long_options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _long_options(sub)
        else:
            yield [o for o in action.option_strings if o.startswith("--")]


def test_every_option_takes_dashes_and_underscores():
    for options in _long_options(casify_cli.build_parser()):
        for option in options:
            name = option[2:]
            assert "--" + name.replace("-", "_") in options and "--" + name.replace("_", "-") in options, options
    args = casify_cli.build_parser().parse_args(["eval", "m", "--data", "d", "--max_examples", "3", "--batch-size", "2"])
    assert args.max_examples == 3 and args.batch_size == 2


def test_the_cli_constants_match_the_package():
    from casify.analysis import CAS_SIDES
    from casify.evaluate import SUITES
    from casify.train import METHODS
    assert tuple(casify_cli.SUITES) == tuple(SUITES) and tuple(casify_cli.CAS_SIDES) == tuple(CAS_SIDES)
    assert tuple(casify_cli.METHODS) == tuple(METHODS)


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    assert casify_cli.main(["eval", missing, "--data", "digits"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert err.startswith("casify eval: error:") and "no folder" in err
    with pytest.raises(casify.LoadError):
        casify_cli.main(["eval", missing, "--data", "digits", "--debug"])


def test_a_bad_set_names_the_command_line_not_the_yaml():
    from casify.recipe import CommandLine, ConfigError, load_recipe

    def load_config(path, overrides):
        return load_recipe(path, CommandLine(overrides=overrides))
    with pytest.raises(ConfigError) as caught:
        load_config(str(TINY), ["trian.lr=0.1"])
    assert "command line" in str(caught.value) and str(TINY) not in str(caught.value)
    bad = TINY.read_text().replace("  lr: 0.05", "  lr: fast")
    with pytest.raises(ConfigError, match="bad.yaml"):
        path = Path(textwrap.dedent(str(TINY))).with_name("bad.yaml")
        try:
            path.write_text(bad)
            load_config(str(path), ["train.epochs=1"])
        finally:
            path.unlink(missing_ok=True)


YAML_EDITS = {  # a bad value in the file, next to an unrelated --set in the same section
    "attack_steps": ("  attack_steps: 2", "  attack_steps: ten"),
    "val_max_examples": ("  val_max_examples: 64", "  val_max_examples: x"),
    "batch_size": ("  batch_size: 32", "  batch_size: 0"),
    "hub": (None, "hub: {model_id: pushme}\n"),
    "defense_options": ("  init: paper", "  init: paper\n  defense_options: {bogus: 1}"),
}


@pytest.mark.parametrize("case", [
    # (what the YAML changes, --set overrides, flags, who must be named, a phrase of the message)
    (None, ["model.defense_options.bogus=1"], {}, "set", "no option 'bogus'"),
    (None, ["train={lr: 0.1, eps: 8}"], {}, "set", "eps"),
    (None, ["hub={push: true}"], {}, "set", "--hub_model_id"),
    ("attack_steps", ["train.eps=4/255"], {}, "file", "attack_steps"),
    ("val_max_examples", ["train.attack_steps=3"], {}, "file", "val_max_examples"),
    ("batch_size", ["train.grad_accum=2"], {}, "file", "batch_size"),
    (None, [], {"hub_model_id": "pushme"}, "flags", "user/name"),
    (None, ["train=5"], {"max_steps": 1}, "set", "train must be a mapping"),
    ("hub", [], {"push_to_hub": True}, "file", "user/name"),
    ("defense_options", ["model.defense=cas"], {}, "file", "no option 'bogus'"),
])
def test_every_error_names_the_source_that_wrote_the_bad_setting(tmp_path, case):
    from casify.recipe import CommandLine, ConfigError, load_recipe
    edit, overrides, flags, source, phrase = case
    path = TINY
    if edit:
        old, new = YAML_EDITS[edit]
        path = tmp_path / "bad.yaml"
        path.write_text(TINY.read_text() + new if old is None else TINY.read_text().replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_recipe(str(path), CommandLine(overrides=overrides, **flags))
    message = str(caught.value)
    expected = {"file": f"{path}: ", "set": "the command line (--set): ", "flags": "the command line: "}[source]
    assert message.startswith(expected) and phrase in message, message


def test_layers_prints_a_table_of_names_shapes_and_layouts(capsys):
    assert casify_cli.main(["layers", "cifar_resnet18", "--input-size", "3", "16", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "shape", "layout", "channels"]
    row = next(line.split() for line in lines if line.startswith("layer4.1 "))
    assert row == ["layer4.1", "512x2x2", "NCHW", "512"]
    # --features adds (N, C) vectors (with --all: the pooled feature vector, a call site); never the logits
    assert casify_cli.main(["layers", "cifar_resnet18", "--input-size", "3", "16", "16", "--all", "--features"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    vectors = [row for row in rows if row[2] == "NC"]
    assert vectors and all(row[1] == "512" for row in vectors) and not any(row[0] == "linear" for row in rows)


def _npz(path, classes, side=32, channels=3, n=4):
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8),
             y=np.arange(n, dtype=np.int64) % classes)
    return str(path)


def _eval(model, data, *extra):
    return ["eval", str(model), "--data", data, "--suite", "quick", "--max-examples", "2", "--batch-size", "2",
            "--no-checks", "--no-progress", *extra]


def test_eval_takes_a_shared_weights_file_and_refuses_a_class_mismatch(tmp_path, capsys):
    from casify.models import resnet2b
    torch.manual_seed(0)
    torch.save({"state_dict": resnet2b().state_dict()}, tmp_path / "resnet2b.pth")
    data = _npz(tmp_path / "ten.npz", classes=10, n=10)
    assert casify_cli.main(_eval(tmp_path / "resnet2b.pth", data)) == 0
    assert "| natural |" in capsys.readouterr().out
    twelve = _npz(tmp_path / "twelve.npz", classes=12, n=12)  # labels up to 11 for a 10-class model
    assert casify_cli.main(_eval(tmp_path / "resnet2b.pth", twelve, "--max-examples", "12")) == 1
    assert "labels in [0, 11] but the model has 10 classes" in capsys.readouterr().err
    # the class count is the model's, not the largest label's: one image labelled 5 is not "6 classes"
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 32, 32, 3), dtype=np.uint8), y=np.array([5]))
    assert casify_cli.main(_eval(tmp_path / "resnet2b.pth", str(one))) == 0, capsys.readouterr().err
    from casify.cli import check_data_fits
    from casify.data import build_dataset
    from casify.model.source import load_model
    small = build_dataset(_npz(tmp_path / "small.npz", classes=10, side=16, n=10), "test")
    with pytest.warns(UserWarning, match=r"shape \(3, 16, 16\) but the model was wrapped for \(3, 32, 32\)"):
        check_data_fits(load_model(str(tmp_path / "resnet2b.pth")), small, "small.npz")


def test_eval_builds_the_users_architecture_only_when_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def small():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 10))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from torch import nn
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
    torch.save(base.state_dict(), tmp_path / "weights.pth")
    casify.wrap(base, ["1"], input_size=(3, 32, 32)).save_pretrained(tmp_path / "folder")
    data = _npz(tmp_path / "ten.npz", classes=10, n=10)
    assert casify_cli.main(_eval("folder", data)) == 1  # a custom base: the error names --arch
    assert "--arch MODULE:FACTORY" in capsys.readouterr().err
    assert casify_cli.main(_eval("folder", data, "--arch", "my_nets:small")) == 0
    assert casify_cli.main(_eval("weights.pth", data, "--arch", "my_nets:small")) == 0
    assert casify_cli.main(_eval("weights.pth", data)) == 1
    assert "--arch" in capsys.readouterr().err


def test_help_shows_defaults_and_says_what_is_slow(capsys):
    """``--help`` states the defaults, warns that the standard suite on a whole dataset is slow on a CPU, says what
    the cascade is (not "strongest attacks first") and prints no "%%" (issue 29, item 13)."""
    texts = {}
    for command in ("eval", "compare", "benchmark", "analyze", "train", "push", "layers"):
        with pytest.raises(SystemExit):
            casify_cli.main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    for command, text in texts.items():
        assert "%%" not in text and "strongest attacks first" not in text, command
    eval_help = texts["eval"]
    assert "examples per attack batch (default: 128)" in eval_help
    assert "seed of the attacks' random starts (default: 0)" in eval_help
    assert "(default: standard)" in eval_help and "hours on a CPU" in eval_help
    assert "which split of --data (default: test)" in eval_help
    assert "then the other attacks in a fixed order" in eval_help
    assert "95 % intervals" in texts["compare"]
    assert "(default: 1000)" in texts["analyze"] and "--n-examples 500" in texts["benchmark"]
