"""Results people can look at: per-example results and the data's SHA-256 in every saved report, the figures, the
eps sweep as the adaptive worst case per eps, L2 end to end, progress lines in a log, the end-of-run table and the
figures on the model card. Tiny nets on generated 8x8 images, trained for a fraction of a second (offline)."""
import io
import json
import re

import pytest
import torch

import casify
from casify.evaluate import EvalReport, evaluate, load_report
from casify.evaluate.examples import decode, encode
from casify.evaluate.runner import check_threat_model
from casify.io.progress import LineProgress, progress_bar
from casify.io.run_table import format_run_table
from casify.attacks.threat_model import ball_noise, distance, format_radius, parse_radius
from conftest import SmallConvNet, fit_small_convnet, separable_data

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    return fit_small_convnet(seed=0, steps=60, num_classes=CLASSES)


@pytest.fixture(scope="module")
def data():
    return separable_data(24, 1, CLASSES)


@pytest.fixture(scope="module")
def report(model, data):
    # cascade (the default): cw20 runs only on the examples fgsm and pgd20 left correct
    return evaluate(model, data, attacks="quick", eps=8 / 255, eps_sweep=[4 / 255, 8 / 255, 16 / 255], progress=False)


def _png_size(path):
    blob = path.read_bytes()
    assert blob[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")


def test_saved_report_keeps_every_example_and_the_data_hash(report, data, tmp_path):
    report.save(tmp_path)
    d = json.loads((tmp_path / "eval_report.json").read_text())
    n = report.n_examples
    assert re.fullmatch(r"[0-9a-f]{64}", d["data"]["sha256"]) and d["data"]["indices"] == list(range(n))
    block = d["per_example"]
    assert set(block["rows"]) >= {r.name for r in report.attacks}
    assert all(len(flags) == n and set(flags) <= set("10-") for flags in block["rows"].values())
    assert "-" in block["rows"]["cw20"]  # a cascade row: not attacked where an earlier row had fooled the example
    assert block["worst_case"] == encode(report.per_example["worst_case"])
    assert block["worst_case"].count("1") == report.worst_case["n_correct"]
    # which rows fooled each example, read back from the file alone
    back = load_report(tmp_path)
    assert back.per_example == report.per_example and back.per_example_families == report.per_example_families
    assert back.data == report.data and back.summary() == report.summary()
    for i in range(n):
        assert (not back.fooled_by(i)) == bool(back.per_example["worst_case"][i])
        assert back.fooled_by(i) == report.fooled_by(i)
    assert decode("10-") == [True, False, None]
    with pytest.raises(ValueError, match="'x'"):
        decode("1x")


def test_data_hash_names_the_images_not_the_run(model, data, report):
    x, y = data
    again = evaluate(model, (x, y), attacks=["fgsm"], batch_size=5, checks=False, progress=False)
    assert again.data["sha256"] == report.data["sha256"]  # other attacks and batch size: the same images
    changed = x.clone()
    changed[3, 0, 0, 0] = 1 - changed[3, 0, 0, 0]
    other = evaluate(model, (changed, y), attacks=["fgsm"], checks=False, progress=False)
    relabelled = evaluate(model, (x, (y + 1) % CLASSES), attacks=["fgsm"], checks=False, progress=False)
    assert len({report.data["sha256"], other.data["sha256"], relabelled.data["sha256"]}) == 3


def test_eps_sweep_is_the_worst_case_at_each_eps(model, data, report):
    curve = {p["eps_str"]: p for p in report.robustness_curve}
    assert list(curve) == ["4/255", "8/255", "16/255"]
    # the point at the evaluation's eps is the evaluation itself: one number per eps
    assert curve["8/255"]["worst_case"] == report.worst_case["accuracy"]
    assert report.accuracy("pgd20@8/255") == report.accuracy("pgd20")
    for eps, name in ((4 / 255, "4/255"), (16 / 255, "16/255")):
        alone = evaluate(model, data, attacks="quick", eps=eps, checks=False, progress=False)
        assert curve[name]["worst_case"] == alone.worst_case["accuracy"]  # every row, not PGD-20 alone
        assert curve[name]["worst_case_per_example"] == encode(alone.per_example["worst_case"])
        assert curve[name]["families"] == {k: f["accuracy"] for k, f in alone.families.items()}
        assert report.accuracy(f"pgd20@{name}") == alone.accuracy("pgd20")
    assert report.check("eps_monotone").passed is not None


def test_figures_are_written_beside_the_report_and_shown_in_it(report, tmp_path):
    report.save(tmp_path)
    assert report.figures == {"robustness_curve": "robustness_curve.png", "attacks": "attacks.png"}
    for name in report.figures.values():
        width, height = _png_size(tmp_path / name)
        assert width > 400 and height > 200
    md = (tmp_path / "eval_report.md").read_text()
    assert "![robustness curve: accuracy against eps](robustness_curve.png)" in md and "(attacks.png)" in md
    assert "| 16/255 |" in md  # the curve's table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attacks.png", "eval_report.json", "eval_report.md",
                                                          "robustness_curve.png"]  # no temporary file left


def test_figures_state_the_threat_model_eps_unit_and_images(report, monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from casify.evaluate import figures
    texts = {}
    original = Figure.savefig

    def record(fig, path, **kwargs):
        found = []
        for ax in fig.axes:
            found += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        found.append(fig.get_suptitle())
        texts[len(texts)] = " ".join(found)
        return original(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    figures.write_report_figures(report, tmp_path)
    curve, attacks = texts[0], texts[1]
    for text in (curve, attacks):
        assert "L-inf, eps 8/255, 24 images, quick suite (cascade)" in text
    assert "eps (L-inf, in /255 grey levels)" in curve and "accuracy (%)" in curve
    assert "newly fooled" in attacks and "accuracy under the row" in attacks


def test_l2_runs_end_to_end(model, data, tmp_path):
    report = evaluate(model, data, attacks="standard", eps=0.5, norm="l2", eps_sweep=[1.5], progress=False)
    assert report.norm == "l2" and report.eps_str == "0.5" and report.summary()["norm"] == "l2"
    linf_names = [r.name for r in evaluate(model, data, attacks="standard", checks=False, progress=False).attacks]
    assert [r.name for r in report.attacks if r.kind != "noise"] == linf_names  # the same suite, in the L2 ball
    for r in report.attacks:
        if r.kind not in ("natural",):
            assert r.settings["norm"] == "l2", r.name
    assert report.attacks[[r.name for r in report.attacks].index("cw20")].settings["objective"] == "cw"
    big = report.check("eps_monotone").evidence["curve"][-1][0]
    assert float(big) == pytest.approx(0.5 * (3 * 8 * 8) ** 0.5, rel=1e-3)  # grey image within reach
    assert [p["eps_str"] for p in report.robustness_curve] == ["0.5", "1.5"]
    assert report.robustness_curve[1]["worst_case"] <= report.natural_accuracy
    report.save(tmp_path)
    assert "L2" in (tmp_path / "eval_report.md").read_text()


def test_l2_threat_model_is_enforced_and_sampled_in_the_ball():
    x = torch.rand(6, 3, 8, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    noisy = ball_noise(x, 0.5, "l2", gens)
    assert bool((distance(noisy, x, "l2") <= 0.5 + 1e-5).all()) and noisy.min() >= 0 and noisy.max() <= 1
    again = ball_noise(x[3:4], 0.5, "l2", [torch.Generator().manual_seed(3)])
    assert torch.equal(again, noisy[3:4])  # per-example draws: independent of the batch

    class Job:
        name, eps, settings = "l2row", 0.5, {"norm": "l2"}

    check_threat_model(Job, x, noisy)
    far = x.clone()
    far[0] = (far[0] + 0.2).clamp(0, 1)  # L-inf 0.2, but far outside the L2 ball of 0.5
    with pytest.raises(RuntimeError, match="l2 distance"):
        check_threat_model(Job, x, far)
    assert format_radius(0.5, "l2") == "0.5" and format_radius(8 / 255, "linf") == "8/255"
    assert parse_radius("2.0", "l2") == 2.0
    with pytest.raises(ValueError):
        parse_radius("2.0", "linf")


def test_autoattack_and_square_run_in_the_l2_ball(model, data):
    x, y = data[0][:8], data[1][:8]
    report = evaluate(model, (x, y), attacks=[], autoattack=True, square_queries=50, eps=3.0, norm="l2",
                      checks=False, per_attack=True, progress=False)
    aa, square = report.attacks[1], report.attacks[2]
    assert aa.settings["norm"] == "L2" and square.settings["norm"] == "l2"
    assert aa.accuracy <= report.natural_accuracy and report.worst_case["accuracy"] <= aa.accuracy


def test_cli_eval_norm_l2_and_refuses_a_linf_eps_above_one(tmp_path, capsys):
    import timm

    from casify_cli import main
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=CLASSES, width=0.125)
    casify.wrap(base, layers=[], input_size=(3, 8, 8), normalize=None).save_pretrained(tmp_path / "model")
    x, y = separable_data(12, 1, CLASSES)
    import numpy as np
    np.savez(tmp_path / "data.npz", x=(x.permute(0, 2, 3, 1).numpy() * 255).astype("uint8"), y=y.numpy())
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "data.npz"), "--suite", "quick",
                 "--norm", "l2", "--eps", "0.5", "--eps-sweep", "1.0", "--out", str(out), "--no-progress"]) == 0
    d = json.loads((out / "eval_report.json").read_text())
    assert d["norm"] == "l2" and d["eps_str"] == "0.5" and [p["eps_str"] for p in d["robustness_curve"]] == ["0.5", "1"]
    assert (out / "robustness_curve.png").read_bytes()[:8] == PNG
    capsys.readouterr()
    with pytest.raises(SystemExit, match="outside \\[0, 1\\]"):
        main(["eval", str(tmp_path / "model"), "--data", "digits", "--eps", "8"])


def test_progress_prints_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("CASIFY_PROGRESS", raising=False)
    stream = io.StringIO()
    bar = progress_bar(total=25, desc="at+cas", every=10, stream=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(25):
        bar.update(1)
        bar.set_postfix(loss="0.500")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3  # at 10, 20 and the end
    assert lines[0].startswith("at+cas: 10/25 (40%)") and lines[-1].startswith("at+cas: 25/25 (100%)")
    assert lines[0].endswith("| loss=0.500")
    short = io.StringIO()
    assert [x for x in progress_bar(range(4), desc="eval", stream=short)] == [0, 1, 2, 3]
    assert short.getvalue().count("\n") == 1 and short.getvalue().startswith("eval: 4/4 (100%)")
    monkeypatch.setenv("CASIFY_PROGRESS", "bar")
    assert not isinstance(progress_bar(total=3, stream=io.StringIO()), LineProgress)


def test_run_table_reads_at_a_glance(report, tmp_path):
    summary = {"method": "at", "cas": True, "output_dir": str(tmp_path / "run"), "steps": 30, "best_step": 20,
               "selected": "best", "test": report.summary()}
    table = format_run_table(summary)
    assert table.splitlines()[0] == "casify AT+CAS: 30 steps; model selected: best (step 20)"
    assert "test set: 24 images, L-inf eps 8/255, quick suite (cascade)" in table
    natural = 100 * report.natural_accuracy
    worst = 100 * report.worst_case["accuracy"]
    assert f"natural                     {natural:6.2f} %" in table
    assert f"worst case (every attack)   {worst:6.2f} %" in table
    assert "<= cw20" not in table or "cw20" in report.summary()["upper_bounds"]
    for family in report.summary()["accuracy"]:
        assert family.replace("_", " ") in table or family in table
    assert f"model:   {tmp_path / 'run' / 'best'}" in table


def test_model_card_shows_the_figures_and_push_uploads_them(report, tmp_path):
    from casify.io.publish import upload_patterns
    report.save(tmp_path / "eval")
    model = casify.wrap(SmallConvNet(CLASSES), layers=["relu3"], input_size=(3, 8, 8), normalize=None)
    folder = casify.write_hub_folder(model, tmp_path / "hub", "me/tiny", evaluation=report.summary(),
                                     figures={k: tmp_path / "eval" / v for k, v in report.figures.items()})
    card = (folder / "README.md").read_text()
    assert "![robustness curve](robustness_curve.png)" in card and "![attacks](attacks.png)" in card
    assert {"robustness_curve.png", "attacks.png"} <= set(upload_patterns(folder))
    with pytest.raises(ValueError, match="not a PNG"):
        casify.write_hub_folder(model, tmp_path / "hub2", "me/tiny", figures={"x": tmp_path / "eval" / "nope.png"})


def test_report_built_by_hand_still_saves(tmp_path):
    """A report without per-example data (built by hand, as the model-card tests do) saves and draws."""
    from casify.evaluate import AttackResult
    rows = [AttackResult("natural", "natural", 0.9, 9, 10, 0.0, 0.0), AttackResult("pgd20", "white-box", 0.5, 5, 10,
                                                                                 0.0, 8 / 255)]
    report = EvalReport(model={"class": "Net"}, dataset="d", n_examples=10, eps=8 / 255, eps_str="8/255", norm="linf",
                        suite="custom", seed=0, seeds={}, batch_size=1, device="cpu", world_size=1,
                        natural_accuracy=0.9, attacks=rows, worst_case={"accuracy": 0.5, "attacks": ["pgd20"]},
                        eps_sweep=[], checks=[], gradient_masking_suspected=None, protocol={"scoring": "x"},
                        versions={}, elapsed_seconds=0.0)
    report.save(tmp_path)
    assert _png_size(tmp_path / "robustness_curve.png")[0] > 0 and _png_size(tmp_path / "attacks.png")[0] > 0


DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "results.md"


# docs/results.md's python example runs (and its figures are checked) in tests/test_docs_examples.py


def test_docs_commands_are_real_options():
    import shlex

    from casify_cli import build_parser
    commands = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)
                for line in block.splitlines() if line.startswith("casify ")]
    assert len(commands) >= 6
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])  # an unknown flag exits with status 2
        assert args.command in ("train", "eval", "compare", "benchmark")
