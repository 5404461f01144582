"""studies/reproduce_gpu/study.py's single-step arms, CPU side: each arm's recipe trains the attack it names, the plan
runs the arms asked for, and the results compare each single-step arm with PGD-3 AT (paired, with the training-time
ratio) from a runs state, without training anything."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_gpu", ROOT / "studies" / "reproduce_gpu" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_arm_trains_its_attack(reproduce, tmp_path):
    args = reproduce.parse_args(["--smoke", "--arms", "at_pgd3", "at_n_fgsm", "at_fgsm_rs", "--runs-dir",
                                 str(tmp_path)])
    args.epochs = 2.0
    attacks = {}
    for arm in args.arms:
        train = reproduce.arm_config(args, arm, 0, "cpu").train
        attacks[arm] = (train.attack, train.attack_steps, train.attack_alpha, train.cas)
    assert attacks["at_pgd3"] == ("pgd", 3, pytest.approx(2.5 * 8 / 255 / 3), False)
    assert attacks["at_n_fgsm"] == ("n_fgsm", 1, None, False)  # None: the paper's step, set by the attack kind
    assert attacks["at_fgsm_rs"] == ("fgsm_rs", 1, None, False)
    assert [u for u in reproduce.plan(args) if u[0] == "train"] == [("train", a, 0) for a in args.arms]
    # the default arms keep the settings that runs dirs written before --arms recorded
    default = reproduce.parse_args(["--runs-dir", str(tmp_path)])
    assert "arms" not in reproduce.settings_of(default) and default.arms == ["at", "at_cas"]
    assert reproduce.settings_of(args)["arms"] == ["at_pgd3", "at_n_fgsm", "at_fgsm_rs"]


def test_results_compare_single_step_arms_with_pgd3(reproduce, tmp_path):
    args = reproduce.parse_args(["--smoke", "--arms", "at_pgd3", "at_n_fgsm", "--seeds", "0", "1", "--runs-dir",
                                 str(tmp_path)])
    args.epochs = 2.0
    summary = lambda worst: {"accuracy": {"natural": 0.5, "worst_case": worst}, "rows": {}, "upper_bounds": [],  # noqa: E731
                             "n": 4, "suite": "quick", "mode": "cascade", "gradient_masking_suspected": False,
                             "failed_checks": []}
    runs = {}
    for seed in (0, 1):
        for arm, seconds, worst in (("at_pgd3", 100.0, [1, 1, 0, 0]), ("at_n_fgsm", 55.0, [1, 0, 0, 0])):
            runs[f"{arm}/s{seed}"] = {
                "arm": arm, "seed": seed, "train_seconds": seconds, "score_seconds": 1.0, "scored_model": "best",
                "summary": summary(sum(worst) / 4), "train_devices": ["cpu"],
                "overfitting": {"step": 7, "rule": "r"} if arm == "at_n_fgsm" and seed == 1 else None,
                "per_example": {"natural": [True, False, True, False], "worst_case": [bool(v) for v in worst]}}
    state = {"settings": reproduce.settings_of(args), "runs": runs, "invocations": [{"device": "cpu"}]}
    path = reproduce.write_results(args, state, tmp_path / "results")
    res = json.loads(path.read_text())
    entry = res["single_step_vs_pgd3"]["at_n_fgsm"]
    assert entry["worst_case"]["per_seed"]["s0"]["difference"] == pytest.approx(-0.25)
    assert entry["train_time_ratio"] == {"s0": pytest.approx(0.55), "s1": pytest.approx(0.55)}
    assert res["comparison"] == {}  # no AT / AT+CAS pair ran
    text = (tmp_path / "results" / "reproduce_gpu.md").read_text()
    assert "Paired comparison N-FGSM AT - PGD-3 AT" in text and "0.55x" in text
    assert "at_n_fgsm/s1: r at step 7" in text
