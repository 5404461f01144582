"""``--out`` folders of ``casify eval`` and ``casify analyze``: a non-empty folder is refused, ``--overwrite`` replaces
only a folder casify wrote (leaving nothing of the earlier run), and a run's files appear all at once."""
import json

import numpy as np
import pytest
import torch

import casify
import casify_cli as cli  # what the installed `casify` command runs
from casify.io.output_dir import MARKER, OutputDirError, output_dir, prepare_output_dir, read_marker


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    """A tiny saved CAS model (a width-1/8 CIFAR ResNet-18 on 16x16 inputs, 5 classes; a registered architecture, so
    ``casify.from_pretrained`` rebuilds it from the folder) and an .npz test set of 16 uint8 NHWC images."""
    import timm
    root = tmp_path_factory.mktemp("cli_outputs")
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=5, width=0.125)
    casify.wrap(base, layers=["layer4.1"], input_size=(3, 16, 16), normalize=None).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             y=np.arange(16, dtype=np.int64) % 5)
    return root / "model", root / "data.npz"


def eval_argv(saved, out, *extra):
    model, data = saved
    return ["eval", str(model), "--data", str(data), "--split", "test", "--suite", "quick", "--max-examples", "8",
            "--batch-size", "8", "--no-checks", "--no-progress", "--out", str(out), *extra]


def analyze_argv(saved, out, *extra):
    model, data = saved
    return ["analyze", str(model), "--data", str(data), "--split", "test", "--steps", "1", "--max-examples", "8",
            "--batch-size", "8", "--device", "cpu", "--out", str(out), *extra]


def siblings(out):
    """Staging / moved-aside folders next to ``out`` (there should be none once a command has returned)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


EVAL_FILES = ("eval_report.json", "eval_report.md", "robustness_curve.png", "attacks.png")  # report and its figures


# -- casify eval -------------------------------------------------------------------------------------------------------
def test_eval_refuses_a_second_run_and_overwrite_leaves_nothing_stale(saved, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(eval_argv(saved, out)) == 0
    assert {p.name for p in out.iterdir()} == {*EVAL_FILES, MARKER}
    marker = read_marker(out)
    assert marker["command"] == "eval" and marker["argv"] == eval_argv(saved, out) and marker["created"]
    assert marker["files"] == sorted(EVAL_FILES)
    # Files from an earlier run (or put there by hand) that this run does not write.
    (out / "eval_report_old.json").write_text("{}")
    (out / "old_figure.png").write_bytes(b"\x89PNG")
    report = (out / "eval_report.json").read_text()
    capsys.readouterr()

    assert cli.main(eval_argv(saved, out)) == 1
    err = capsys.readouterr().err
    assert "casify eval: error:" in err and "not empty" in err and "eval_report_old.json" in err
    assert "--overwrite" in err and "another --out" in err
    assert (out / "eval_report_old.json").exists() and (out / "eval_report.json").read_text() == report

    assert cli.main(eval_argv(saved, out, "--overwrite")) == 0
    assert {p.name for p in out.iterdir()} == {*EVAL_FILES, MARKER}
    assert json.loads((out / "eval_report.json").read_text())["n_examples"] == 8
    assert read_marker(out)["argv"][-1] == "--overwrite"
    assert siblings(out) == []


def test_eval_never_empties_a_folder_casify_did_not_write(saved, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        assert cli.main(eval_argv(saved, out, *extra)) == 1
        err = capsys.readouterr().err
        assert "notes.txt" in err and "did not write" in err and "another --out" in err
        assert "--overwrite does not apply" in err
    # The check comes before any work: a model that does not exist is never reached.
    assert cli.main(["eval", str(tmp_path / "no-such-model"), "--data", "digits", "--out", str(out),
                     "--overwrite"]) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert siblings(out) == []


def test_eval_uses_a_missing_or_empty_folder(saved, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(eval_argv(saved, empty)) == 0
    assert (empty / "eval_report.json").exists() and read_marker(empty)["command"] == "eval"
    nested = tmp_path / "a" / "b"
    assert cli.main(eval_argv(saved, nested)) == 0
    assert (nested / "eval_report.md").exists() and siblings(nested) == []


# -- casify analyze ----------------------------------------------------------------------------------------------------
def test_analyze_refuses_a_second_run_and_overwrite_leaves_nothing_stale(saved, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert cli.main(analyze_argv(saved, out)) == 0
    written = {"channel_magnitude.png", "channel_report.json", "channel_report.md", MARKER}
    assert written <= {p.name for p in out.iterdir()}
    assert read_marker(out)["command"] == "analyze"
    data = json.loads((out / "channel_report.json").read_text())
    assert data["capture_point"] == "before CAS mask (input of cas_modules.layer4_1)"
    assert data["figures"]["magnitude"] == "channel_magnitude.png"  # relative: valid after the staging rename
    (out / "tsne.png").write_bytes(b"\x89PNG")  # as if an earlier run had --tsne
    capsys.readouterr()

    assert cli.main(analyze_argv(saved, out)) == 1
    err = capsys.readouterr().err
    assert "casify analyze: error:" in err and "tsne.png" in err and "--overwrite" in err
    assert (out / "tsne.png").exists()

    assert cli.main(analyze_argv(saved, out, "--overwrite")) == 0
    assert not (out / "tsne.png").exists() and written <= {p.name for p in out.iterdir()}
    printed = json.loads(capsys.readouterr().out)
    assert printed["figures"]["report"] == str(out / "channel_report.json")
    assert siblings(out) == []

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "figure.png").write_bytes(b"")
    assert cli.main(analyze_argv(saved, mine, "--overwrite")) == 1
    assert "did not write" in capsys.readouterr().err and (mine / "figure.png").exists()


def test_a_crash_mid_write_leaves_no_half_report(saved, tmp_path, monkeypatch):
    out = tmp_path / "analysis"
    assert cli.main(analyze_argv(saved, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(model, data, layer, staging, **kwargs):
        (staging / "channel_report.json").write_text('{"layer": ')  # half a report, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(casify.analysis, "run_analysis", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main(analyze_argv(saved, out, "--overwrite"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier report, whole
    assert siblings(out) == []
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        cli.main(analyze_argv(saved, fresh))
    assert not fresh.exists() and siblings(fresh) == []


# -- the helper --------------------------------------------------------------------------------------------------------
def test_prepare_output_dir_rules(tmp_path, monkeypatch):
    assert prepare_output_dir(tmp_path / "new") == (tmp_path / "new").resolve()
    assert not (tmp_path / "new").exists()  # checking changes nothing
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match="is a file"):
        prepare_output_dir(tmp_path / "file", overwrite=True)

    many = tmp_path / "many"
    many.mkdir()
    for i in range(9):
        (many / f"f{i}.txt").write_text("")
    with pytest.raises(OutputDirError, match=r"f0\.txt, f1\.txt, f2\.txt, f3\.txt, f4\.txt, \.\.\. and 4 more"):
        prepare_output_dir(many)
    (many / MARKER).write_text("not json")  # a broken or foreign marker does not count
    with pytest.raises(OutputDirError, match="did not write"):
        prepare_output_dir(many, overwrite=True)

    with output_dir(tmp_path / "ours", command="test", argv=["x"]) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".ours.casify-partial-")
        assert not (tmp_path / "ours").exists()  # nothing under the final name until the end
        (staging / "a.txt").write_text("a")
    ours = tmp_path / "ours"
    assert read_marker(ours)["files"] == ["a.txt"] and read_marker(ours)["argv"] == ["x"]
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare_output_dir(ours)
    assert prepare_output_dir(ours, overwrite=True) == ours.resolve()
    monkeypatch.chdir(ours)  # never replace the folder the process runs in
    with pytest.raises(OutputDirError, match="current directory"):
        prepare_output_dir(ours, overwrite=True)


def test_eval_compiled_channels_last_gives_the_same_report(saved, tmp_path):
    """``--compile --channels-last`` (compiled with the eager backend here: inductor's CPU compile takes minutes)."""
    assert cli.main(eval_argv(saved, tmp_path / "plain")) == 0
    assert cli.main(eval_argv(saved, tmp_path / "fast", "--compile", "--compile-backend", "eager", "--channels-last")) == 0
    plain = json.loads((tmp_path / "plain" / "eval_report.json").read_text())
    fast = json.loads((tmp_path / "fast" / "eval_report.json").read_text())
    assert fast["model"]["compiled"] and fast["model"]["channels_last"] and fast["model"]["class"] == "DefendedModel"
    assert fast["natural_accuracy"] == plain["natural_accuracy"] and fast["worst_case"] == plain["worst_case"]
    assert fast["cascade"] == plain["cascade"]  # every row attacked and fooled the same examples
