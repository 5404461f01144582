"""How every study scores a run: the adaptive union, matched attacks, restart saturation, AutoAttack and Square,
and the routing echo, each at the study's radius. Why one module: a number in one study means what it means in
another only if both scored it the same way.
"""
from __future__ import annotations

import time

import torch

EPS = 8 / 255  # pixel space, L-inf
SATURATION = {"steps": 100, "restarts": 4, "seed": 1}
ECHO = {"max_examples": 500, "steps": 20}
AA_EXAMPLES = 200  # AutoAttack (standard) and Square on the first 200 test images
SQUARE_QUERIES = 5000
MATCHED_ROWS = 7  # the first seven rows of union_attacks: the families every arm gets on its own default objective


def union_attacks(defended: bool) -> list:
    """The adaptive union: the standard suite's rows, PGD-100 x 3 on the model's own objective and, for a defended
    model, the defense-specific rows ("adaptive": each head alone, fixed routings), final-logit PGD-20 / CW-20, and
    the BPDA rows (the defense's adaptive backward with the routing passed straight through) at PGD-100 x 3. A test
    image counts as robust only if it survives every row."""
    from casify.attacks import Attack
    obj = "cas" if defended else "ce"
    rows = ["fgsm", "pgd20", "cw20", "pgd100", "apgd-dlr", "apgd-t",
            Attack(name="pgd100x3", steps=100, restarts=3, objective=obj)]
    if defended:
        rows += ["adaptive",
                 Attack(name="pgd100x3", steps=100, restarts=3, objective="cas", routing="straight-through"),
                 Attack(name="pgd20", steps=20, objective="ce"),
                 Attack(name="cw20", kind="cw", steps=20, kappa=50.0, objective="cw")]
    return rows


def score_union(model, test, defended: bool, sha: str, eps: float = EPS) -> dict:
    """The union's score of one run, per-example flags kept (score.json)."""
    from casify.core.code_version import code_version
    from casify.evaluate import evaluate
    start = time.time()
    report = evaluate(model, test, attacks=union_attacks(defended), eps=eps, seed=0, progress=False, checks=True)
    summary = report.summary()
    return {"n": report.n_examples, "natural": report.natural_accuracy,
            "worst_case": report.worst_case["accuracy"], "families": summary["accuracy"],
            "rows": [r.name for r in report.attacks],
            "gradient_masking_suspected": report.gradient_masking_suspected,
            "failed_checks": summary["failed_checks"], "per_example": report.per_example, "model_sha256": sha,
            "seconds": round(time.time() - start, 1), "code": code_version(), "versions": report.versions, "eps": eps}


def score_matched(model, test, defended: bool, union: dict, eps: float = EPS) -> dict:
    """Every arm under the same seven families (each on its model's own default objective); for a plain model these
    are the union's own rows, so its union is reused."""
    from casify.evaluate import evaluate
    if not defended:
        return {"rows": "the union's rows (identical for a plain model)", "worst_case": union["worst_case"],
                "per_example": union["per_example"]["worst_case"], "seconds": 0.0}
    start = time.time()
    report = evaluate(model, test, attacks=union_attacks(defended)[:MATCHED_ROWS], eps=eps, seed=0, progress=False,
                      checks=True)
    return {"rows": [r.name for r in report.attacks], "worst_case": report.worst_case["accuracy"],
            "per_example": report.per_example["worst_case"], "seconds": round(time.time() - start, 1)}


def score_saturation(model, test, defended: bool, union: dict, eps: float = EPS) -> dict:
    """How many of the union's survivors 4 more PGD-100 restarts (another seed) fool: near 0 means the union has
    saturated."""
    from casify.attacks import Attack
    from casify.evaluate import evaluate
    start = time.time()
    robust = [i for i, ok in enumerate(union["per_example"]["worst_case"]) if ok]
    newly = 0
    if robust:
        attack = Attack(name=f"pgd{SATURATION['steps']}x{SATURATION['restarts']}", steps=SATURATION["steps"],
                        restarts=SATURATION["restarts"], objective="cas" if defended else "ce")
        report = evaluate(model, torch.utils.data.Subset(test, robust), attacks=[attack], eps=eps,
                          seed=SATURATION["seed"], progress=False, checks=False)
        newly = sum(1 for ok in report.per_example["worst_case"] if not ok)
    return {"survivors": len(robust), "newly_fooled": newly, **SATURATION, "seconds": round(time.time() - start, 1)}


def score_autoattack(model, test, union: dict, n: int = AA_EXAMPLES, eps: float = EPS) -> dict:
    """AutoAttack (standard version) and Square (:data:`SQUARE_QUERIES` queries) on the first ``n`` test images, and
    the union's worst case joined with them on those images."""
    from casify.evaluate import evaluate
    start = time.time()
    report = evaluate(model, test, attacks=[], eps=eps, seed=0, progress=False, checks=False, autoattack=True,
                      square_queries=SQUARE_QUERIES, max_examples=n)
    rows = {r.name: r for r in report.attacks}
    natural = report.per_example["natural"]
    out = {"n": report.n_examples, "seconds": None, "rows": {}}
    joined = [bool(u) for u in union["per_example"]["worst_case"][:report.n_examples]]
    for name, row in rows.items():
        flags = [bool(a and c) for a, c in zip(report.per_example[name], natural)]
        out["rows"][name] = {"kind": row.kind, "accuracy": sum(flags) / len(flags), "per_example": flags,
                             "flags": row.settings.get("flags", [])}
        joined = [j and f for j, f in zip(joined, flags)]
    out["union_on_these"] = sum(bool(u) for u in union["per_example"]["worst_case"][:report.n_examples]) / len(joined)
    out["union_and_these"] = sum(joined) / len(joined)
    out["seconds"] = round(time.time() - start, 1)
    return out


def score_echo(model, test, beta: float, sha: str, eps: float = EPS) -> dict:
    from casify.evaluate import routing_echo
    start = time.time()
    echo = routing_echo(model, test, eps=eps, steps=ECHO["steps"], beta=beta, max_examples=ECHO["max_examples"],
                        seed=0)
    return {**echo.to_dict(), "model_sha256": sha, "seconds": round(time.time() - start, 1)}


__all__ = ["AA_EXAMPLES", "ECHO", "EPS", "MATCHED_ROWS", "SATURATION", "SQUARE_QUERIES", "score_autoattack",
           "score_echo", "score_matched", "score_saturation", "score_union", "union_attacks"]
