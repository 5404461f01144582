"""An evaluation never credits a broken model, and the Python API refuses what the CLI refuses (issue 29, items 1-4):
NaN / inf logits are wrong answers that are counted and flagged, NaN / inf / 0..255 / uint8 inputs and empty datasets
are one clear error, a class-count mismatch is caught from the model's own class count in evaluate(), the Trainer and
the CLI alike, and ``casify eval --out`` is checked before any work."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import casify
import casify_cli
from casify.data.data_fit import InputSizeWarning, check_data_fits
from casify.evaluate import evaluate, routing_echo
from casify.evaluate.plan import Job
from casify.evaluate.runner import check_threat_model
from casify.train import TrainConfig, Trainer


class NaNWhenPerturbed(nn.Module):
    """Confidently class 0 on the clean images (every pixel 0.5), NaN on anything else: what a numerically broken
    model looks like to an attack. ``argmax`` over NaN is 0, so scored naively it is 100 % robust on class-0 data."""

    def __init__(self, num_classes: int = 3, value: float = float("nan")):
        super().__init__()
        self.num_classes = num_classes
        self.value = value
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        clean = (x == 0.5).flatten(1).all(dim=1, keepdim=True)
        logits = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        logits[:, 0] = 5.0
        logits = logits * self.scale + 0.0 * x.flatten(1).sum(dim=1, keepdim=True)
        return torch.where(clean, logits, torch.full_like(logits, self.value))


def _clean_class_zero(n=8):
    return torch.full((n, 3, 4, 4), 0.5), torch.zeros(n, dtype=torch.long)


# -- 1. NaN / inf logits are wrong answers, counted, named and flagged --------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("checks", [True, False])
def test_a_model_that_outputs_nan_under_attack_is_not_robust(value, checks, one_thread):
    report = evaluate(NaNWhenPerturbed(value=value), _clean_class_zero(), attacks="quick", progress=False,
                      checks=checks, per_attack=True)
    assert report.natural_accuracy == 1.0  # the clean images give finite logits
    assert report.accuracy("fgsm") == 0.0 and report.accuracy("pgd20") == 0.0  # it read 100 % before
    assert report.worst_case["accuracy"] == 0.0
    assert report.nonfinite_logits["fgsm"] == 8 and report.nonfinite_logits["pgd20"] == 8
    assert "natural" not in report.nonfinite_logits
    assert report.gradient_masking_suspected is True  # also with checks=False: never "not checked"
    assert report.check("finite_logits").passed is False
    summary = report.summary()
    assert "finite_logits" in summary["failed_checks"] and summary["nonfinite_logits"]["pgd20"] == 8
    assert "non-finite logits" in report.to_markdown()
    # the summary travels as data (the model card, config.json): it reads back
    from casify.io.eval_summary import EvalSummary
    assert EvalSummary.from_dict(summary).nonfinite_logits == summary["nonfinite_logits"]


def test_an_attack_counts_nan_logits_as_fooled(one_thread):
    x, y = _clean_class_zero(4)
    _, info = casify.attacks.pgd(NaNWhenPerturbed(), x, y, eps=8 / 255, steps=2, return_info=True)
    assert bool(info.fooled.all()) and bool(info.fooled_any.all())
    logits = torch.tensor([[float("nan"), 0.0], [3.0, 1.0], [float("inf"), 0.0]])
    assert casify.attacks.predicted_correctly(logits, torch.zeros(3, dtype=torch.long)).tolist() == [False, True, False]


def test_an_honest_model_has_no_nonfinite_logits(one_thread):
    from conftest import fit_small_convnet, separable_data
    x, y = separable_data(16, 7, 4)
    report = evaluate(fit_small_convnet(), (x, y), attacks=["fgsm"], progress=False)
    assert report.nonfinite_logits == {} and report.check("finite_logits").passed is True


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_input_images_is_refused(bad, one_thread):
    from conftest import fit_small_convnet, separable_data
    x, y = separable_data(8, 7, 4)
    x[5, 0, 2, 2] = bad  # not the first image: the per-batch check finds it
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate(fit_small_convnet(), (x, y), attacks=["fgsm"], progress=False, checks=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        casify.attacks.pgd(fit_small_convnet(), x, y, eps=8 / 255, steps=1)


def test_an_attack_result_with_nan_pixels_leaves_the_threat_model():
    x = torch.full((2, 3, 4, 4), 0.5)
    x_adv = x.clone()
    x_adv[1, 0, 0, 0] = float("nan")  # `dist > eps` is False for NaN: it passed before
    job = Job(name="broken", kind="white-box", eps=8 / 255, settings={}, notes="", craft=lambda *a: x_adv)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        check_threat_model(job, x, x_adv)


# -- 2. an empty dataset is one clear error --------------------------------------------------------------------------
@pytest.mark.parametrize("checks", [True, False])
def test_an_empty_dataset_is_an_error_not_a_number(checks, one_thread):
    from conftest import fit_small_convnet
    empty = (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no examples"):
        evaluate(fit_small_convnet(), empty, attacks="quick", progress=False, checks=checks)
    with pytest.raises(ValueError, match="max_examples must be at least 1"):
        evaluate(fit_small_convnet(), (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), max_examples=0,
                 progress=False)


def test_the_routing_echo_of_no_examples_is_an_error_not_a_division_by_zero(one_thread):
    from conftest import TinyNet
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)
    with pytest.raises(ValueError, match="at least one example"):
        routing_echo(model, TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize("no_checks", [False, True])
def test_casify_eval_on_an_empty_file_says_so(tmp_path, capsys, no_checks, one_thread):
    model = _cas_folder(tmp_path)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 8, 3), dtype=np.uint8), y=np.zeros(0, dtype=np.int64))
    argv = ["eval", str(model), "--data", str(tmp_path / "empty.npz"), "--suite", "quick", "--no-progress"]
    assert casify_cli.main(argv + (["--no-checks"] if no_checks else [])) == 1
    err = capsys.readouterr().err
    assert "no examples" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def _cas_folder(tmp_path, num_classes=5):
    """A saved CAS model a folder can rebuild (a timm architecture), for 8x8 RGB images."""
    import timm
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=num_classes, width=0.125)
    casify.wrap(base, layers=["layer3.1"], input_size=(3, 8, 8), normalize=None).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# -- 3. the Python API has the CLI's guards: one shared check -------------------------------------------------------
def test_evaluate_refuses_labels_past_the_models_classes(one_thread):
    from conftest import TinyNet
    torch.manual_seed(0)
    plain = TinyNet(num_classes=5)  # states no class count: its output width says 5
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) + 4  # labels 4..9
    with pytest.raises(ValueError, match=r"labels in \[4, 9\] but the model has 5 classes"):
        evaluate(plain, (x, y), attacks=["fgsm"], progress=False)


def test_evaluate_and_the_trainer_refuse_a_dataset_with_another_class_count(tmp_path, one_thread):
    from casify.data import build_dataset
    from conftest import TinyNet
    torch.manual_seed(0)
    digits = build_dataset("digits", "test", size=8)  # states 10 classes; every label is below 12
    twelve = casify.wrap(TinyNet(num_classes=12), layers=["block"], input_size=(3, 8, 8), normalize=None)
    with pytest.raises(ValueError, match="the model has 12 classes but the digits test data has 10"):
        evaluate(twelve, digits, attacks=["fgsm"], max_examples=8, progress=False)
    config = TrainConfig(method="at", cas=True, max_steps=1, batch_size=8, attack_steps=1, output_dir=str(tmp_path),
                         progress=False)
    with pytest.raises(ValueError, match="the model has 12 classes but the training set has 10"):
        Trainer(twelve, build_dataset("digits", "train", size=8), None, config)
    five = casify.wrap(TinyNet(num_classes=5), layers=["block"], input_size=(3, 8, 8), normalize=None)
    with pytest.raises(ValueError, match="the training set has labels in .* but the model has 5 classes"):
        Trainer(five, TensorDataset(torch.rand(16, 3, 8, 8), torch.arange(16) % 10), None, config)


def test_the_class_count_is_the_models_not_the_largest_label(tmp_path, one_thread):
    from casify.data import build_dataset
    from conftest import TinyNet
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 8, 8, 3), dtype=np.uint8), y=np.array([2]))
    one = build_dataset(tmp_path / "one.npz", "test")
    assert one.num_classes == 3 and one.num_classes_from_labels  # a guess, which the model overrides
    torch.manual_seed(0)
    fit = check_data_fits(TinyNet(num_classes=5), one, "one.npz")
    assert fit.num_classes == 5 and fit.n == 1


@pytest.mark.parametrize("images, phrase", [
    (lambda x: (x * 255).round().to(torch.uint8), "divide by 255"),
    (lambda x: x * 255, "divide by 255"),
])
def test_evaluate_says_divide_by_255_for_0_to_255_images(images, phrase, one_thread):
    from conftest import fit_small_convnet, separable_data
    x, y = separable_data(8, 7, 4)
    with pytest.raises((TypeError, ValueError), match=phrase) as caught:
        evaluate(fit_small_convnet(), (images(x), y), attacks=["fgsm"], progress=False)
    assert "left the threat model" not in str(caught.value)


def test_another_image_size_warns_alike_in_evaluate_the_trainer_and_the_cli(tmp_path, capsys, one_thread):
    from conftest import TinyNet
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)
    big = TensorDataset(torch.rand(8, 3, 12, 12), torch.arange(8) % 5)
    with pytest.warns(InputSizeWarning, match=r"shape \(3, 12, 12\) but the model was wrapped for \(3, 8, 8\)"):
        evaluate(model, big, attacks=["fgsm"], progress=False, checks=False)
    config = TrainConfig(method="at", cas=True, max_steps=1, batch_size=8, attack_steps=1, output_dir=str(tmp_path),
                         progress=False)
    with pytest.warns(InputSizeWarning, match=r"shape \(3, 12, 12\)"):
        Trainer(model, big, None, config)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the model takes \(3, 8, 8\)"):  # channels: an error
        evaluate(model, TensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4)), attacks=["fgsm"], progress=False)
    folder = _cas_folder(tmp_path)
    np.savez(tmp_path / "big.npz", x=np.zeros((4, 12, 12, 3), dtype=np.uint8), y=np.arange(4))
    with pytest.warns(InputSizeWarning, match=r"shape \(3, 12, 12\)"):
        assert casify_cli.main(["eval", str(folder), "--data", str(tmp_path / "big.npz"), "--suite", "quick",
                                "--no-checks", "--no-progress"]) == 0


# -- 4. --out is checked before the evaluation; no claim of a JSON that is not written -------------------------------
def test_an_unwritable_out_is_refused_before_the_evaluation(tmp_path, capsys, monkeypatch):
    import casify.evaluate

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran before --out was checked")
    monkeypatch.setattr(casify.evaluate, "evaluate", never)
    folder = _cas_folder(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    for out in (tmp_path / "a-file" / "report", "/proc/casify-cannot-write-here"):
        assert casify_cli.main(["eval", str(folder), "--data", "digits", "--out", str(out), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("casify eval: error: --out") and "Traceback" not in err, err


def test_the_markdown_points_at_eval_report_json_only_when_one_is_written(tmp_path, capsys, one_thread):
    folder = _cas_folder(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8, 3), dtype=np.uint8), y=np.arange(4))
    argv = ["eval", str(folder), "--data", str(tmp_path / "d.npz"), "--suite", "quick", "--no-checks",
            "--no-progress"]
    assert casify_cli.main(argv) == 0
    assert "eval_report.json" not in capsys.readouterr().out
    assert casify_cli.main(argv + ["--out", str(tmp_path / "out")]) == 0
    assert "per-example results in eval_report.json" in capsys.readouterr().out
    assert "per-example results in eval_report.json" in (tmp_path / "out" / "eval_report.md").read_text()


# -- 11, 12. what a newcomer sees: names, figures, chance ------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_report():
    """An untrained CAS-wrapped timm model on digits: at chance, which every figure and text must show."""
    import timm

    from casify.data import build_dataset
    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet18", num_classes=10, width=0.125)
    model = casify.wrap(base, layers=["layer4.1"], input_size=(3, 16, 16), normalize=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(model, build_dataset("digits", "test"), attacks=["fgsm"], max_examples=64, progress=False,
                        checks=False)
    finally:
        torch.set_num_threads(threads)


def test_reports_name_the_architecture_and_the_dataset_and_flag_chance(untrained_report):
    report = untrained_report
    assert report.model["architecture"] == "cifar_resnet18" and report.model["class"] == "DefendedModel"
    assert report.dataset == "digits" and report.split == "test" and report.num_classes == 10
    md = report.to_markdown()
    assert "- model: cifar_resnet18 with CAS at layer4.1" in md and "- data: digits (test), 64 examples" in md
    assert "DefendedModel" not in md and "TensorImageDataset" not in md
    assert report.at_chance and "is at chance** for 10 classes" in md
    assert report.summary()["num_classes"] == 10


def test_the_run_table_flags_a_model_at_chance():
    from casify.io.run_table import format_run_table
    test = {"n": 359, "num_classes": 10, "eps_str": "8/255", "suite": "quick",
            "accuracy": {"natural": 0.078, "pgd20": 0.078, "worst_case": 0.078}, "gradient_masking_suspected": False}
    table = format_run_table({"method": "at", "cas": True, "steps": 5, "selected": "best", "test": test})
    assert "AT CHANCE: natural 7.80 % for 10 classes" in table
    learned = {**test, "accuracy": {"natural": 0.95, "pgd20": 0.6, "worst_case": 0.55}}
    assert "AT CHANCE" not in format_run_table({"method": "at", "steps": 300, "selected": "best", "test": learned})
    broken = {**learned, "nonfinite_logits": {"pgd20": 3}}
    assert "NaN / inf logits (scored wrong): pgd20 on 3" in format_run_table({"test": broken})


def test_figures_show_chance_full_scale_axes_whole_counts_and_no_legend_over_the_data(untrained_report, tmp_path,
                                                                                      monkeypatch):
    from matplotlib.figure import Figure

    from casify.evaluate import figures
    drawn = []
    original = Figure.savefig

    def record(fig, path, **kwargs):
        result = original(fig, path, **kwargs)  # draws the figure: the artists' extents are known after
        drawn.append(fig)
        return result

    monkeypatch.setattr(Figure, "savefig", record)
    figures.write_report_figures(untrained_report, tmp_path)
    curve, attacks = drawn
    (ax,) = curve.axes
    assert ax.get_ylim() == (0.0, 100.0)
    assert any(line.get_label().startswith("chance (10 %") for line in ax.lines)
    legend = ax.get_legend()
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())  # beside the curves, not on them
    title = ax.get_title()
    assert "cifar_resnet18" in title and "digits, test split" in title and "DefendedModel" not in title
    left, right = attacks.axes
    assert left.get_xlim() == (0.0, 100.0)  # accuracy: never to 120 %
    assert any(line.get_label().startswith("chance 10 %") for line in left.lines)
    ticks = [t for t in right.get_xticks() if right.get_xlim()[0] <= t <= right.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # counts of examples: no 0.2, 0.4, ...
    suptitle = attacks.get_suptitle()
    assert "))" not in suptitle and "(digits, test split)" in suptitle and "cifar_resnet18" in suptitle
    (fig_legend,) = attacks.legends
    assert not any(fig_legend.get_window_extent().overlaps(a.get_window_extent()) for a in attacks.axes)
