"""The evaluation cannot overstate a CAS model quietly: rows are named by what they attack, every suite is adaptive,
the best iterate is scored, and the checks flag final-logit-only and last-iterate evaluations. The models here are
built by hand, so every outcome holds by construction."""
import json

import pytest
import torch

from casify import attacks
from casify import evaluate as ev
from casify.attacks import Attack
from casify.evaluate import evaluate, suite_attacks
from casify.evaluate.plan import LARGE_EPS_ROLE
from conftest import SmallConvNet
from test_attack_iterates import Window, flip_inputs, routing_flip

pytestmark = pytest.mark.usefixtures("one_thread")


@attacks.register_objective("test:probe")
def _probe(inp):
    """The third logit of :class:`Window`: maximising it raises the mean pixel steadily."""
    return inp.logits[:, 2]


def test_every_suite_is_adaptive_on_a_cas_model():
    for suite in ev.SUITES:
        rows = suite_attacks(suite, 8 / 255, cas=True, num_modules=2)
        assert rows and all(a.sees_aux for a in rows.values()), suite
        assert all("[" in name and "final-logits" not in name for name in rows), suite
        assert {"pgd20[cas]", "cw20[cas]", "pgd20[cas,straight-through]"} <= set(rows)
        assert rows["cw20[cas]"].objective == "cw_cas"
    standard = suite_attacks("standard", 8 / 255, cas=True, num_modules=2)
    assert {"pgd20[aux:0]", "pgd20[aux:1]", "cw20[aux:0]", "cw20[aux:1]", "pgd20[cas,clean-routing]",
            "pgd20[cas,soft-routing]", "pgd100[cas]"} <= set(standard)
    # a plain model keeps the plain names and objectives
    assert list(suite_attacks("quick", 8 / 255, cas=False)) == ["fgsm", "pgd20", "cw20"]
    assert all(a.keep == "best" for a in standard.values())


def test_final_logit_only_evaluation_of_a_cas_model_is_flagged():
    model = routing_flip()
    x, y = flip_inputs(32)
    report = evaluate(model, (x, y), attacks=[Attack(name="pgd20", steps=20, objective="ce")], progress=False,
                      per_attack=True)
    # the final-logit row says so, and the adaptive reference that catches it is not a row
    assert [r.name for r in report.attacks] == ["natural", "pgd20[final-logits]", "noise"]
    assert report.accuracy("pgd20[final-logits]") == 1.0 and report.worst_case["accuracy"] == 1.0
    summary = report.summary()
    assert "pgd20" not in summary["accuracy"] and summary["accuracy"]["pgd20[final-logits]"] == 1.0
    check = report.check("final_logits_vs_adaptive")
    assert check.passed is False
    assert check.evidence["adaptive_row"] == ev.CHECK_ADAPTIVE and check.evidence["adaptive_pgd20"] == 0.0
    assert check.evidence["final_logits_pgd20"] == 1.0
    assert report.gradient_masking_suspected is True
    assert summary["gradient_masking_suspected"] is True and "final_logits_vs_adaptive" in summary["failed_checks"]
    assert "| final_logits_vs_adaptive | **FAIL** |" in report.to_markdown()
    assert ev.CHECK_ADAPTIVE not in report.worst_case["attacks"]


def test_adaptive_suite_breaks_what_final_logits_cannot():
    model = routing_flip()
    x, y = flip_inputs(32)
    report = evaluate(model, (x, y), attacks="quick", progress=False, per_attack=True)
    assert report.natural_accuracy == 1.0 and report.accuracy("noise") == 1.0
    assert report.accuracy("pgd20[cas]") == 0.0 and report.accuracy("pgd20[cas,straight-through]") == 0.0
    assert report.summary()["accuracy"]["pgd20"] == 0.0 and report.worst_case["accuracy"] == 0.0
    check = report.check("final_logits_vs_adaptive")
    # covered: the reported worst case is the adaptive one; the gap is the evidence that final logits are masked
    assert check.passed is True
    assert check.evidence["final_logits_pgd20"] == 1.0 and check.evidence["final_minus_adaptive"] == 1.0
    assert "masked" in check.evidence["verdict"]
    assert all("final-logits" not in r.name for r in report.attacks)


def test_last_iterate_evaluation_is_flagged_and_best_iterate_scores_the_window():
    x, y = torch.full((8, 3, 4, 4), 0.5), torch.zeros(8, dtype=torch.long)
    spec = dict(name="probe8", eps=0.1, alpha=0.01, steps=8, objective="test:probe", random_start=False)
    last = evaluate(Window(), (x, y), attacks=[Attack(keep="last", **spec)], eps=0.1, progress=False, per_attack=True)
    assert last.accuracy("probe8") == 1.0  # the last iterate is past the window
    check = last.check("best_vs_last_iterate")
    assert check.passed is False and check.evidence["probe8"] == {"best": 0.0, "last": 1.0, "keep": "last"}
    assert last.gradient_masking_suspected is True
    best = evaluate(Window(), (x, y), attacks=[Attack(**spec)], eps=0.1, progress=False, per_attack=True)
    row = best.attacks[1]
    assert row.name == "probe8" and row.accuracy == 0.0 and row.last_iterate_accuracy == 1.0
    assert best.check("best_vs_last_iterate").passed is False  # the gap alone is far beyond two tolerances
    assert "last iterate 100.00 %" in best.to_markdown()


def test_not_checked_is_none_everywhere(tmp_path):
    torch.manual_seed(0)
    model = SmallConvNet(4).eval()
    x, y = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    report = evaluate(model, (x, y), attacks=["fgsm"], checks=False, progress=False)
    assert report.checks == [] and report.gradient_masking_suspected is None
    summary = report.summary()
    assert summary["gradient_masking_suspected"] is None and summary["failed_checks"] is None
    report.save(tmp_path)
    d = json.loads((tmp_path / "eval_report.json").read_text())
    assert d["gradient_masking_suspected"] is None
    assert "Gradient masking suspected: **not checked**" in (tmp_path / "eval_report.md").read_text()
    checked = evaluate(model, (x, y), attacks=["fgsm"], progress=False)
    assert checked.gradient_masking_suspected in (True, False)
    assert checked.summary()["failed_checks"] == [c.name for c in checked.checks if c.passed is False]


def test_rows_are_named_by_objective_on_cas_models_only():
    model = routing_flip()
    x, y = flip_inputs(8)
    report = evaluate(model, (x, y), attacks=["pgd20", Attack(name="mine", steps=3, objective="aux:0"),
                                              Attack(name="st", steps=3, objective="ce", routing="straight-through"),
                                              Attack(name="tagged[already]", steps=2, objective="ce")],
                      checks=False, progress=False, per_attack=True)
    assert [r.name for r in report.attacks] == ["natural", "pgd20[cas]", "mine[aux:0]",
                                                "st[final-logits,straight-through]", "tagged[already]"]
    families = report.summary()["families"]
    # rows that see the heads (objective or routing) aggregate under their plain family; a final-logit one does not
    assert families["pgd20"] == ["pgd20[cas]"] and families["mine"] == ["mine[aux:0]"]
    assert families["st"] == ["st[final-logits,straight-through]"] and "tagged[already]" in families
    plain = evaluate(SmallConvNet(3).eval(), (x, y), attacks=["pgd20", Attack(name="mine", steps=3)], checks=False,
                     progress=False)
    assert [r.name for r in plain.attacks] == ["natural", "pgd20", "mine"]


def _fabricated(flags: dict, last: dict = None):
    """Jobs, results and flag matrices for ``run_checks`` from per-example correct flags by row name."""
    jobs, results = [], []
    n = len(next(iter(flags.values())))
    flags = dict(sorted(flags.items(), key=lambda kv: kv[0].startswith("pgd20@")))  # check-only jobs come last
    for name, f in flags.items():
        kind = {"natural": "natural", "noise": "noise"}.get(name.split("@")[0], "white-box")
        if name.startswith("pgd20@"):
            kind = "check"
        role = name if name in ("fgsm", "pgd20", "pgd100") else None
        if kind == "check":  # the large-eps PGD-20 the eps_monotone check reads
            role = LARGE_EPS_ROLE
        jobs.append(ev.Job(name, kind, 8 / 255, {"keep": "best"}, "", None, kind not in ("check",), role=role,
                           iterative=name.startswith("pgd") and kind != "check"))
        acc = sum(f) / n
        results.append(ev.AttackResult(name, kind, acc, sum(f), n, 0.0, 8 / 255, {}, "", kind != "check",
                                       last_iterate_accuracy=(sum((last or {}).get(name, f)) / n)
                                       if jobs[-1].iterative else None))
    correct = torch.tensor([flags[j.name] for j in jobs]).T
    correct_last = torch.tensor([(last or {}).get(j.name, flags[j.name]) for j in jobs]).T
    n_rows = sum(1 for j in jobs if j.kind != "check")
    return ev.run_checks(ev.CheckInputs(results, jobs, n_rows, correct, correct_last, correct.clone(),
                                        [torch.zeros(n, dtype=bool)], n, 8 / 255, cas=False))


def test_new_checks_on_fabricated_outcomes():
    n = 100
    ones = [True] * n

    def first(k):  # correct on all but the first k examples
        return [i >= k for i in range(n)]

    def last_k(k):  # correct on all but the last k examples
        return [i < n - k for i in range(n)]

    base = {"natural": ones, "noise": ones, f"pgd20@{ev.format_eps(ev.LARGE_EPS)}": [False] * n}
    # an iterative attack weaker than one step: flagged
    checks = {c.name: c for c in _fabricated({**base, "fgsm": first(50), "pgd20": first(20)})}
    assert checks["iterative_beats_single_step"].passed is False
    checks = {c.name: c for c in _fabricated({**base, "fgsm": first(20), "pgd20": first(50)})}
    assert checks["iterative_beats_single_step"].passed is True
    # two attacks that each fool 40 %, different 40 %: the worst case (20 %) lies far below both
    checks = {c.name: c for c in _fabricated({**base, "pgd20": first(40), "pgd100": last_k(40)})}
    assert checks["worst_case_near_single_attacks"].passed is False
    assert checks["worst_case_near_single_attacks"].evidence["worst_case"] == pytest.approx(0.2)
    checks = {c.name: c for c in _fabricated({**base, "pgd20": first(40), "pgd100": first(42)})}
    assert checks["worst_case_near_single_attacks"].passed is True
    # a last iterate far weaker than the best one
    checks = {c.name: c for c in _fabricated({**base, "pgd20": first(60)}, last={"pgd20": first(10)})}
    assert checks["best_vs_last_iterate"].passed is False
    checks = {c.name: c for c in _fabricated({**base, "pgd20": first(60)}, last={"pgd20": first(57)})}
    assert checks["best_vs_last_iterate"].passed is True
    assert checks["final_logits_vs_adaptive"].passed is None  # no CAS modules


@pytest.mark.parametrize("per_attack", [False, True], ids=["cascade", "per-attack"])
def test_results_do_not_depend_on_the_batch_size(per_attack):
    from test_attack_iterates import cas_net, make_data, train
    model = train(cas_net())
    x, y = make_data(40, 21)
    kwargs = dict(attacks="quick", eps=0.06, progress=False, eps_sweep=[0.03], per_attack=per_attack)
    with torch.backends.mkldnn.flags(enabled=False):  # batch-independent CPU kernels (see test_eval_cascade.py)
        small = evaluate(model, (x, y), batch_size=7, **kwargs)
        large = evaluate(model, (x, y), batch_size=40, **kwargs)
    assert small.per_example == large.per_example
    assert [r.last_iterate_accuracy for r in small.attacks] == [r.last_iterate_accuracy for r in large.attacks]
    assert small.seeds == large.seeds and small.worst_case == large.worst_case
    assert small.cascade == large.cascade and small.summary() == large.summary()
    if not per_attack:  # the cascade really skipped examples: rows after PGD-20 ran on the survivors only
        assert small.accuracy("cw20[cas]") is None and None in small.per_example["cw20[cas]"]
