"""A study's judgement and report: each comparison by the crossed rule (:data:`casify.evaluate.compare.CROSSED_SEED_RULE`),
never across code versions, Holm over the family, and ``results/study.json`` with the study's README. Why a module of
its own: the rule is written before the first run and the report only reads what the runs left, so neither needs
the worker (``study`` is a :class:`studies._protocol.Study`, which imports this module).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from studies._archive import collect, copy_selected_models, run_folder
from studies._records import read_json, write_json


def comparison(runs: Dict[Tuple[str, int], dict], a: str, b: str, metric_key: str = "worst_case") -> dict:
    """A vs B on the seeds both have, by the crossed rule; refused (reported, never judged) when any pair of runs
    ran different commits or a tree with local changes."""
    import numpy as np
    from casify.evaluate.compare import crossed_seed_comparison
    seeds = sorted(s for (arm, s) in runs if arm == a and (b, s) in runs)
    out = {"A": a, "B": b, "seeds": seeds}
    # every commit that trained (each resumption too) or scored a run of either arm, and any local changes
    commits = {c for arm in (a, b) for s in seeds for c in runs[(arm, s)].get("commits", [runs[(arm, s)].get("commit")])}
    dirty = any(runs[(arm, s)].get("dirty") for arm in (a, b) for s in seeds)
    if len(commits) > 1 or None in commits:
        out["verdict"] = f"not judged: the arms ran different code ({sorted(str(c)[:10] for c in commits)})"
        return out
    if dirty:
        out["verdict"] = f"not judged: runs of a tree with local changes (commit {str(next(iter(commits)))[:10]})"
        return out
    if len(seeds) < 3:
        out["verdict"] = f"not judged: {len(seeds)} paired seeds (the rule needs 3)"
        mean = {"matched": "matched_worst_case"}.get(metric_key, metric_key)  # the run's accuracy of those flags
        out["per_seed_diff"] = [runs[(a, s)][mean] - runs[(b, s)][mean] for s in seeds]
        return out
    fa = np.array([runs[(a, s)]["_flags"][metric_key] for s in seeds])
    fb = np.array([runs[(b, s)]["_flags"][metric_key] for s in seeds])
    result = crossed_seed_comparison(fa, fb, seeds)
    out.update(result.to_dict())
    out["_result"] = result
    return out


def judge(comparisons: Dict[str, dict]) -> Dict[str, dict]:
    """Holm over the whole family (members not judged count with p = 1); each judged one gets ``p_holm`` and its
    final ``verdict``."""
    from casify.evaluate.compare import judge_family
    judged = {k: c["_result"] for k, c in comparisons.items() if "_result" in c}
    judge_family(judged, family_size=len(comparisons))  # unjudged members count with p = 1
    for k, result in judged.items():
        comparisons[k].update(result.to_dict())
        del comparisons[k]["_result"]
    return comparisons


def write_rule(results: Path, rule: dict) -> Path:
    """``results/study.json`` with the decision rule, written once, before the first run (refused afterwards)."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "study.json"
    if path.exists():
        raise SystemExit(f"{path} exists: the rule is written once, before the first run")
    write_json(path, {"decision_rule": rule})
    return path


def report(study: "Study", runs_dir: Path, results: Path, models: Path, comparisons: Dict[str, Tuple[str, str]],
           title: str, module: str, annotate: Optional[Callable] = None, extend: Optional[Callable] = None,
           records: Optional[Path] = None) -> dict:
    """Judge the family on the worst case (and the matched attacks, where every run has them), report natural
    accuracy beside it, and write ``results/study.json``, the study's README and the seed-0 models.
    ``annotate(run_dir, run)`` may add a study's own columns to a run; ``extend(record, runs)`` may add the
    study's own results to the record and returns markdown lines for the README."""
    runs = collect(study, runs_dir, records)
    if annotate is not None:
        for (name, seed), run in runs.items():
            annotate(run_folder(study, runs_dir, records, name, seed), run)
    path = results / "study.json"
    record = read_json(path)
    record["comparisons"] = judge({k: comparison(runs, a, b) for k, (a, b) in comparisons.items()})
    if all(r["_flags"]["matched"] is not None for r in runs.values()):
        record["matched"] = judge({k: comparison(runs, a, b, "matched") for k, (a, b) in comparisons.items()})
    record["natural"] = {k: {kk: vv for kk, vv in comparison(runs, a, b, "natural").items() if kk != "_result"}
                         for k, (a, b) in comparisons.items()}
    record["runs"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs.values()]
    record["per_example_worst_case"] = {f"{r['arm']}/s{r['seed']}": "".join("1" if f else "0"
                                                                           for f in r["_flags"]["worst_case"])
                                        for r in runs.values()}
    record["cpu_hours"] = round(sum(r["train_seconds"] + r["score_seconds"] for r in runs.values()) / 3600, 2)
    record["committed_models"] = copy_selected_models(
        study, runs_dir, [(arm, 0) for arm in study.arms if (arm, 0) in runs], models,
        expected={f"{arm}_s0": runs[(arm, 0)]["model_sha256"] for arm in study.arms if (arm, 0) in runs})
    extra = extend(record, runs) if extend is not None else []
    write_json(path, record)
    (results.parent / "README.md").write_text(study_markdown(title, module, record, extra))
    print(f"wrote {path} ({len(runs)} runs)")
    return record


def study_markdown(title: str, module: str, record: dict, extra: Sequence[str] = ()) -> str:
    """A study's README: its rule, the judged comparisons (Holm), and one row per run with its provenance."""
    rule = record["decision_rule"]
    lines = [f"# {title}", "",
             f"`python -m {module} --work` (two workers, from a worktree pinned to one commit), then `--report`. "
             f"Protocol: `{json.dumps(rule.get('protocol') or rule.get('protocols'))}`.", "",
             f"Decision rule (committed before the first run): {rule['rule']}", "",
             "## Comparisons (A - B, points of worst-case accuracy on test846, eps 8/255)", "",
             "| comparison | worst case (union) | verdict (Holm) | matched attacks | natural |", "|---|---|---|---|---|"]
    for name, c in record.get("comparisons", {}).items():
        nat = record.get("natural", {}).get(name, {})
        matched = record.get("matched", {}).get(name, {})
        nat_text = (f"{100 * nat['mean_diff']:+.1f} (t [{100 * nat['t_ci95'][0]:+.1f}, {100 * nat['t_ci95'][1]:+.1f}])"
                    if "t_ci95" in nat else nat.get("verdict", "-"))
        lines.append(f"| {c['A']} vs {c['B']} | {interval(c)} | **{c.get('verdict')}** | "
                     f"{interval(matched) if matched else '-'} | {nat_text} |")
    authors = any(r.get("authors_evaluation") is not None for r in record.get("runs", []))
    lines += ["", "## Runs (test846, %)", "",
              "| arm | seed | natural | worst case | matched | saturation (newly fooled / survivors) | AutoAttack, "
              "Square (200 images; the union on them) | echo: forced all (null) |"
              + (" authors' evaluation |" if authors else "") + " train s | score s | commit | SHA-256 |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if authors else "") + "---|---|---|---|"]
    for r in record.get("runs", []):
        sat, echo, aa = r.get("saturation"), r.get("echo"), r.get("autoattack")
        aa_text = "-"
        if aa:
            parts = [f"{k} {pct(v['accuracy'])}" for k, v in aa.items() if isinstance(v, dict)]
            aa_text = ", ".join(parts) + f" (union {pct(aa['union_on_these'])})"
        sat_text = f"{sat['newly_fooled']} / {sat['survivors']}" if sat else "-"
        echo_text = f"{pct(echo['forced_all'])} ({pct(echo.get('forced_null'))})" if echo else "-"
        lines.append(f"| {r['arm']} | {r['seed']} | {pct(r['natural'])} | {pct(r['worst_case'])} | "
                     f"{pct(r.get('matched_worst_case'))} | {sat_text} | {aa_text} | {echo_text} | "
                     + (f"{pct(r.get('authors_evaluation'))} | " if authors else "")
                     + f"{r['train_seconds']:.0f} | {r['score_seconds']:.0f} | `{str(r['commit'])[:10]}` | "
                     f"`{r['model_sha256'][:16]}` |")
    lines += ["", f"CPU time of these runs: {record.get('cpu_hours')} h (one thread each). The selected model of "
                  "seed 0 of every arm is in `models/` (re-score it with `casify eval`).", ""]
    # a study's own section (its goal) right under the title, before the rule and the tables
    return "\n".join(lines[:2] + list(extra) + [""] + lines[2:] if extra else lines)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def interval(c: dict) -> str:
    if "t_ci95" not in c:
        if c.get("per_seed_diff"):  # too few seeds to judge: the differences so far, never a verdict
            return "per seed " + ", ".join(f"{100 * d:+.1f}" for d in c["per_seed_diff"]) + " (not judged)"
        return c.get("verdict", "-")
    t, b = c["t_ci95"], c["bootstrap_ci95"]
    return (f"{100 * c['mean_diff']:+.1f} (t [{100 * t[0]:+.1f}, {100 * t[1]:+.1f}], crossed bootstrap "
            f"[{100 * b[0]:+.1f}, {100 * b[1]:+.1f}]; p {c['p']:.3f}, Holm {c['p_holm']:.3f}; {len(c['seeds'])} seeds)")


__all__ = ["comparison", "interval", "judge", "pct", "report", "study_markdown", "write_rule"]
