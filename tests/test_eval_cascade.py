"""The cascade (``evaluate(per_attack=False)``, the default): strongest attacks first, each on the examples still
robust. Random draws are per example, so the per-example worst case must be the full run's exactly, and no result may
depend on the batch size; ``per_attack=True`` still gives every row. Small nets trained for a second (offline)."""
import json

import pytest
import torch

from casify.evaluate import CASCADE_RANKS, evaluate
from conftest import SmallConvNet
from test_attacks import NUM_CLASSES, cas_net, make_data, train

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.05  # PGD-20 leaves about half of the examples, and the later rows fool a few more of them


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    return train(cas_net()), train(SmallConvNet(NUM_CLASSES))


@pytest.fixture(scope="module")
def both(models):
    model, surrogate = models
    x, y = make_data(48, 5)
    kwargs = dict(attacks="standard", eps=EPS, progress=False, transfer_from=surrogate, eps_sweep=[EPS / 2])
    # oneDNN may pick kernels by batch size; ATen's own CPU convolution works image by image, so an example's result
    # does not depend on its batch on any CPU (the property under test, not a kernel detail)
    with torch.backends.mkldnn.flags(enabled=False):
        full = evaluate(model, (x, y), per_attack=True, batch_size=48, **kwargs)
        cascade = evaluate(model, (x, y), batch_size=16, **kwargs)
    return full, cascade


def test_cascade_equals_the_full_run_per_example(both):
    full, cascade = both
    assert cascade.per_attack is False and full.per_attack is True
    # robust to every attack, per example: the same examples
    assert cascade.per_example["worst_case"] == full.per_example["worst_case"]
    assert cascade.worst_case == full.worst_case
    assert 0 < cascade.worst_case["n_correct"] < cascade.n_examples  # something to cascade, something left
    # the same rows in the same order, each fooling the same examples that were still robust
    key = ("row", "newly_fooled", "robust_after")
    assert [tuple(c[k] for k in key) for c in cascade.cascade] == [tuple(c[k] for k in key) for c in full.cascade]
    assert cascade.cascade[-1]["robust_after"] == cascade.worst_case["n_correct"]
    assert sum(c["newly_fooled"] for c in cascade.cascade) == cascade.n_examples - cascade.worst_case["n_correct"]
    for c in cascade.cascade:
        flags, reference = cascade.per_example[c["row"]], full.per_example[c["row"]]
        if c["every_example"]:
            assert flags == reference, c["row"]
        else:  # on the examples it attacked, a cascade row decides exactly as in the full run
            assert c["attacked"] == sum(f is not None for f in flags) < cascade.n_examples, c["row"]
            assert all(f == r for f, r in zip(flags, reference) if f is not None), c["row"]
    # the sweep and the check-only attacks run on every example in both modes
    assert [r.accuracy for r in cascade.eps_sweep] == [r.accuracy for r in full.eps_sweep]
    assert cascade.check("final_logits_vs_adaptive").evidence == full.check("final_logits_vs_adaptive").evidence


def test_cascade_runs_strongest_first_and_skips_what_is_fooled(both):
    full, cascade = both
    order = [c["row"] for c in cascade.cascade]
    assert order[:4] == ["natural", "fgsm[cas]", "pgd20[cas]", "noise"]  # on every example
    assert order[4:9] == ["pgd20[cas,straight-through]", "apgd-dlr[cas]", "apgd-t3[cas,target-routing]", "cw20[cas]",
                          "pgd100[cas]"]
    assert order[-1] == "transfer-pgd20"  # black-box last
    ranks = {r.name: r for r in cascade.attacks}
    survivors = [c for c in cascade.cascade if not c["every_example"]]
    assert {c["row"] for c in survivors} == {r.name for r in cascade.attacks} - set(order[:4])
    alive = cascade.cascade[3]["robust_after"]
    for c in survivors:  # each attacked exactly the examples every earlier row left correct
        assert c["attacked"] == alive, c["row"]
        alive = c["robust_after"]
        r = ranks[c["row"]]
        assert r.accuracy is None and r.n_correct is None and r.last_iterate_accuracy is None
        assert cascade.accuracy(c["row"]) is None
    # the cascade costs less: PGD-100 attacked a fraction of the examples
    pgd100 = next(c for c in cascade.cascade if c["row"] == "pgd100[cas]")
    pgd20 = next(c for c in cascade.cascade if c["row"] == "pgd20[cas]")
    assert pgd100["attacked"] <= pgd20["robust_after"] < 0.75 * cascade.n_examples
    assert min(CASCADE_RANKS.values()) == 0


def test_per_attack_mode_gives_every_row(both):
    full, _ = both
    assert all(r.accuracy is not None and r.attacked == full.n_examples for r in full.attacks)
    assert all(None not in flags for flags in full.per_example.values())
    summary = full.summary()
    assert summary["mode"] == "per-attack" and summary["upper_bounds"] == []
    assert list(summary["accuracy"]) == ["natural", "fgsm", "pgd20", "cw20", "pgd100", "apgd-dlr", "apgd-t",
                                         "transfer-pgd20", "worst_case"]
    assert set(summary["rows"]) == {r.name for r in full.attacks if r.kind != "noise"}
    assert "| attack | accuracy % | notes |" in full.to_markdown()
    assert full.check("more_steps_do_not_help").passed is not None


def test_cascade_summary_reports_only_what_it_computed_whole(both):
    full, cascade = both
    summary = cascade.summary()
    assert summary["mode"] == "cascade"
    # natural, FGSM and the main PGD-20 ran on every example; cw20, pgd100 and transfer did not: left out
    assert list(summary["accuracy"]) == ["natural", "fgsm", "pgd20", "worst_case"]
    assert summary["rows"] == {"natural": cascade.natural_accuracy, "fgsm[cas]": cascade.accuracy("fgsm[cas]"),
                               "pgd20[cas]": cascade.accuracy("pgd20[cas]")}
    # pgd20 combines only pgd20[cas] here: an upper bound on the full family (which also has the heads, routings...)
    assert summary["families"]["pgd20"] == ["pgd20[cas]"] and summary["upper_bounds"] == ["pgd20"]
    full_summary = full.summary()
    assert summary["accuracy"]["pgd20"] >= full_summary["accuracy"]["pgd20"]
    assert summary["accuracy"]["pgd20"] == full.accuracy("pgd20[cas]")
    assert summary["accuracy"]["fgsm"] == full_summary["accuracy"]["fgsm"]
    assert summary["accuracy"]["worst_case"] == full_summary["accuracy"]["worst_case"]
    md = cascade.to_markdown()
    assert "mode: cascade" in md and "| attacked | newly fooled | robust after % |" in md and "survivors" in md
    assert "| pgd20 | <= " in md
    d = json.loads(cascade.to_json())
    assert d["per_attack"] is False and [c["row"] for c in d["cascade"]] == [c["row"] for c in cascade.cascade]


def test_cascade_checks_adapt(both):
    full, cascade = both
    checks = {c.name: c for c in cascade.checks}
    assert checks["more_steps_do_not_help"].passed is None
    assert "cascade" in checks["more_steps_do_not_help"].evidence["skipped"]
    # the checks on rows that ran on every example agree with the full run
    for name in ("eps_monotone", "pgd_beats_noise", "nonzero_gradients", "final_logits_vs_adaptive"):
        assert checks[name].passed == full.check(name).passed, name
        assert checks[name].evidence == full.check(name).evidence, name
    # black-box: transfer attacked the white-box survivors; what it fooled there is the evidence
    evidence = checks["black_box_not_stronger"].evidence
    transfer = next(c for c in cascade.cascade if c["row"] == "transfer-pgd20")
    assert evidence["transfer-pgd20_attacked"] == transfer["attacked"]
    assert evidence["transfer-pgd20_fooled_survivors"] == transfer["newly_fooled"]
    # best vs last iterate: on the examples each row attacked
    iterates = checks["best_vs_last_iterate"].evidence
    assert iterates["pgd100[cas]"]["attacked"] == next(c["attacked"] for c in cascade.cascade
                                                       if c["row"] == "pgd100[cas]")
    assert "attacked" not in iterates["pgd20[cas]"]
    assert checks["worst_case_near_single_attacks"].passed in (True, False, None)


def test_cascade_with_nothing_left_skips_the_later_rows(models):
    model, _ = models
    x, y = make_data(16, 9)
    report = evaluate(model, (x, y), attacks="quick", eps=0.5, progress=False, checks=False)
    assert report.worst_case["n_correct"] == 0
    later = [c for c in report.cascade if not c["every_example"]]
    assert later and all(c["attacked"] == 0 and c["newly_fooled"] == 0 for c in later)
    assert all(f is None for c in later for f in report.per_example[c["row"]])


def test_autoattacks_own_flags_are_passed_through(models, monkeypatch):
    """A flag AutoAttack raises (its warnings) fails the autoattack_flags check with the text as evidence; a run
    without flags passes it; without AutoAttack the check is skipped."""
    import warnings

    from casify.evaluate import blackbox
    message = "Square Attack has decreased the robust accuracy of 2.50%."

    class FlaggingAutoAttack:
        def __init__(self, model, norm, eps, version, device, seed, verbose=False):
            pass

        def run_standard_evaluation(self, x, y, bs):
            warnings.warn(Warning(message))
            return x.clone()

    model, _ = models
    x, y = make_data(16, 5)
    monkeypatch.setattr(blackbox, "load_autoattack", lambda: (FlaggingAutoAttack, "autoattack"))
    flagged = evaluate(model, (x, y), attacks=["fgsm", "pgd20"], eps=EPS, progress=False, autoattack=True)
    check = flagged.check("autoattack_flags")
    assert check.passed is False and flagged.gradient_masking_suspected
    assert check.evidence["flags"]["autoattack[final-logits]"] == [message]
    assert evaluate(model, (x, y), attacks=["fgsm"], eps=EPS, progress=False).check("autoattack_flags").passed is None


def test_autoattack_joins_the_cascade_on_the_survivors(models, monkeypatch):
    """AutoAttack, when asked for, runs after the white-box rows on the examples they left robust, and enters the
    worst case (a stand-in records what it was given: the real package takes minutes on a CPU)."""
    from casify.evaluate import blackbox
    seen = []

    class FakeAutoAttack:
        def __init__(self, model, norm, eps, version, device, seed, verbose=False):
            pass

        def run_standard_evaluation(self, x, y, bs):
            seen.append(x.shape[0])
            return x.clone()  # fools nothing: the worst case is then the white-box rows' 

    monkeypatch.setattr(blackbox, "load_autoattack", lambda: (FakeAutoAttack, "autoattack"))
    model, _ = models
    x, y = make_data(48, 5)
    report = evaluate(model, (x, y), attacks="quick", eps=EPS, progress=False, autoattack=True, batch_size=48)
    aa = next(c for c in report.cascade if c["row"] == "autoattack[final-logits]")
    before = report.cascade[report.cascade.index(aa) - 1]["robust_after"]
    assert report.cascade[-1] is aa and aa["attacked"] == before == seen[0] and 0 < before < report.n_examples
    assert "autoattack[final-logits]" in report.worst_case["attacks"]
    assert report.worst_case["n_correct"] == aa["robust_after"]
    assert report.accuracy("autoattack[final-logits]") is None
    assert "autoattack[final-logits]" not in report.summary()["accuracy"]
    full = evaluate(model, (x, y), attacks="quick", eps=EPS, progress=False, autoattack=True, per_attack=True,
                    checks=False)
    assert seen[-1] == report.n_examples and full.accuracy("autoattack[final-logits]") is not None


def test_cascade_progress_shows_the_running_worst_case_over_every_example(models, monkeypatch):
    """A later row runs on the survivors only; its bar shows the worst case over all examples (falling towards the
    report's), not the share of survivors still robust (which read 100 % on a strong model)."""
    import tqdm.auto

    shown = []

    class Bar(list):
        def __init__(self, iterable, desc="", **kwargs):
            super().__init__(iterable)
            self.desc = desc

        def set_postfix(self, **values):
            shown.append((self.desc, values))

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setenv("CASIFY_PROGRESS", "bar")  # a bar, as on a terminal (a log file gets lines: casify.io.progress)
    model, _ = models
    x, y = make_data(24, 5)
    report = evaluate(model, (x, y), attacks="quick", eps=EPS, progress=True, checks=False, batch_size=8)
    later = [values["worst_case"] for desc, values in shown if " on " in desc]
    assert later, shown
    final = 100 * report.summary()["accuracy"]["worst_case"]
    assert later[-1] == f"{final:.1f}%"
    first_pass_end = [v["worst_case"] for d, v in shown if " on " not in d][-1]
    running = [float(first_pass_end[:-1])] + [float(v[:-1]) for v in later]
    assert running == sorted(running, reverse=True)  # it only falls
