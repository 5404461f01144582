"""``casify compare`` / ``compare_models``: models side by side on the same images, eps and suite, paired statistics
against the first, overlaid curves, and a refusal naming what differs. Tiny nets on generated 8x8 images."""
import json

import numpy as np
import pytest
import torch

import casify
from casify.evaluate import IncomparableReports, compare_models, evaluate, paired
from conftest import fit_small_convnet, separable_data

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
EPS = 8 / 255


def fit(seed, steps):
    return fit_small_convnet(seed=seed, steps=steps, num_classes=CLASSES)  # trained once per session, copied


@pytest.fixture(scope="module")
def data():
    return separable_data(24, 1, CLASSES)


@pytest.fixture(scope="module")
def folders(data, tmp_path_factory):
    """Report folders of a trained and a barely trained model, same images, eps and suite."""
    root = tmp_path_factory.mktemp("reports")
    for name, steps in (("strong", 60), ("weak", 4)):
        evaluate(fit(0, steps), data, attacks="quick", eps=EPS, eps_sweep=[4 / 255], progress=False).save(root / name)
    return root / "strong", root / "weak"


def test_table_and_paired_statistics_against_the_first(folders, tmp_path):
    strong, weak = folders
    result = compare_models([strong, weak], out=tmp_path / "cmp")
    assert result.labels == ["strong", "weak"] and result.metrics[0] == "natural" and result.metrics[-1] == "worst_case"
    a, b = casify.evaluate.load_report(strong), casify.evaluate.load_report(weak)
    assert result.table["strong"]["worst_case"] == a.worst_case["accuracy"]
    assert result.table["weak"]["pgd20"] == b.families["pgd20"]["accuracy"]
    worst = next(p for p in result.pairs if p["metric"] == "worst_case")
    expected = paired(b.per_example["worst_case"], a.per_example["worst_case"]).to_dict()
    assert worst["pooled"] == expected and worst["per_seed"] == [expected]  # weak vs strong, image by image
    assert {p["metric"] for p in result.pairs} == set(result.metrics)
    assert any("weak vs strong, worst case:" in s and "McNemar z" in s for s in result.statement)
    md = (tmp_path / "cmp" / "compare_report.md").read_text()
    assert "| strong | 1 |" in md and "## Against strong (paired, same images)" in md
    assert "![robustness curves overlaid](robustness_curves.png)" in md
    assert (tmp_path / "cmp" / "robustness_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "cmp" / "compare_report.json").read_text())
    assert saved["setting"]["data_sha256"] == a.data["sha256"] and saved["curves"]["strong"]["4/255"] is not None


@pytest.mark.parametrize("change, what", [
    (dict(eps=4 / 255), "eps: other 4/255 vs strong 8/255"),
    (dict(attacks=["fgsm", "pgd20"]), "suite: other 'custom' vs strong 'quick'"),
    (dict(norm="l2", eps=EPS), "norm: other l2 vs strong linf"),
    (dict(images=20), "images: other was evaluated on 20 images"),
])
def test_refuses_reports_that_differ_and_says_how(folders, data, change, what):
    x, y = data
    n = change.pop("images", len(y))
    kwargs = dict(attacks="quick", eps=EPS, progress=False, checks=False)
    kwargs.update(change)
    other = evaluate(fit(0, 4), (x[:n], y[:n]), **kwargs)
    with pytest.raises(IncomparableReports, match="cannot compare") as err:
        compare_models([folders[0], other], labels=["strong", "other"])
    assert what in str(err.value)


def test_several_seeds_per_model_use_the_seed_rule(data):
    x, y = data
    arms = [[evaluate(fit(seed, steps), (x[:16], y[:16]), attacks=["fgsm"], checks=False, progress=False)
             for seed in range(3)] for steps in (40, 3)]
    result = compare_models(arms, labels=["trained", "untrained"])
    assert result.runs == [["EvalReport"] * 3] * 2
    worst = next(p for p in result.pairs if p["metric"] == "worst_case")
    assert len(worst["per_seed"]) == 3 and worst["pooled"]["n"] == 48
    assert worst["seed_rule"]["verdict"] in ("A better", "A worse", "inconclusive") and "welch" in worst
    assert "seed rule says" in " ".join(result.statement)
    with pytest.raises(ValueError, match="same number of runs"):
        compare_models([arms[0], arms[1][:2]])


def test_cli_compare_evaluates_model_folders_and_refuses_a_mismatch(folders, tmp_path, capsys):
    import timm

    from casify_cli import main
    for seed in (0, 1):
        torch.manual_seed(seed)
        base = timm.create_model("cifar_resnet18", num_classes=CLASSES, width=0.125)
        casify.wrap(base, layers=[], input_size=(3, 8, 8), normalize=None).save_pretrained(tmp_path / f"m{seed}")
    x, y = separable_data(8, 1, CLASSES)
    np.savez(tmp_path / "data.npz", x=(x.permute(0, 2, 3, 1).numpy() * 255).astype("uint8"), y=y.numpy())
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "m0"), str(tmp_path / "m1"), "--data", str(tmp_path / "data.npz"),
                 "--suite", "quick", "--eps", "8/255", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| m0 | 1 |" in printed and "m1 vs m0, worst case:" in printed
    assert {"compare_report.json", "compare_report.md", "robustness_curves.png"} <= {p.name for p in out.iterdir()}
    # report folders made on other images: refused, exit status 1, the reason on stderr
    assert main(["compare", str(folders[0]), str(tmp_path / "m1"), "--data", str(tmp_path / "data.npz"),
                 "--suite", "quick", "--no-progress"]) == 1
    assert "casify compare: error: cannot compare" in capsys.readouterr().err


def test_cli_compare_takes_weights_files_as_casify_eval_does(tmp_path, capsys):
    """``casify compare A.pth B.pth`` failed with "'utf-8' codec can't decode": a file was read as a report."""
    from casify_cli import main
    from casify.models import resnet2b
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save({"state_dict": resnet2b().state_dict()}, tmp_path / f"resnet2b_{seed}.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ten.npz", x=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y=np.arange(4))
    weights = [str(tmp_path / "resnet2b_0.pth"), str(tmp_path / "resnet2b_1.pth")]
    assert main(["compare", *weights, "--data", str(tmp_path / "ten.npz"), "--suite", "quick", "--max-examples",
                 "2", "--batch-size", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert "| resnet2b_0.pth | 1 |" in capsys.readouterr().out
    # a file that is neither a report nor a model: one line, no decode error
    (tmp_path / "junk.json").write_bytes(b"\x80\x81 not json")
    assert main(["compare", str(tmp_path / "junk.json"), weights[0], "--data", str(tmp_path / "ten.npz"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is not an evaluation report" in err and "codec" not in err
