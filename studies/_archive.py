"""Where a study's runs are kept: a worker's scratch run folder, the study's committed archive of finished runs
(``runs/<arm>_s<seed>/``, seed 0's model in ``models/``), and the scored runs collected from either for the report.
Why: scratch folders live on one machine for one session; the archive outlives both, and the report reads whichever
holds a run's complete records. ``study`` is a :class:`studies._protocol.Study` (only its ``run_dir`` and
``complete`` are used, so this module does not import it: the worker imports the archive).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from studies._records import read_json, sha256


def archived(records: Path, arm: str, seed: int) -> Path:
    """``<records>/runs/<arm>_s<seed>``: a finished run's committed records (see :func:`archive_run`)."""
    return Path(records) / "runs" / f"{arm}_s{seed}"


def archive_run(study: "Study", runs_dir: Path, records: Path, name: str, seed: int) -> Path:
    """Copy a finished run's records into the study's folder ``records`` (``runs/<arm>_s<seed>/``: every JSON record
    of the run folder - config and code history, training record, every score - and the selected model's
    ``config.json``) and seed 0's selected
    model into ``models/<arm>_s0/``. Why: workers' scratch folders live on one machine for one session, the
    committed folder outlives both; a later worker (another session, another machine, the same pinned commit) skips
    what is archived, and ``--report`` reads it. Compact JSON: the per-example flags are most of a record."""
    src = study.run_dir(runs_dir, name, seed)
    dest = archived(records, name, seed)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "final").mkdir(parents=True)
    scratch = {"train_seconds_partial.json", "error.json"}  # a worker's bookkeeping, not the run's record
    for path in sorted(src.glob("*.json")):
        if path.name not in scratch:
            (tmp / path.name).write_text(json.dumps(read_json(path), separators=(",", ":"), default=str))
    shutil.copyfile(src / "final" / "config.json", tmp / "final" / "config.json")
    if seed == 0:  # the model is in place before the archive that promises it
        copy_selected_models(study, runs_dir, [(name, 0)], Path(records) / "models")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def copy_selected_models(study: "Study", runs_dir: Path, runs: Sequence[Tuple[str, int]], dest: Path,
                         expected: Optional[Dict[str, str]] = None) -> dict:
    """Copy the selected model folder (config.json + model.safetensors) of ``runs`` into ``dest/<arm>_s<seed>/``, so
    the study's numbers can be re-scored from outside (``casify eval dest/<arm>_s<seed> ...``); returns each
    copy's SHA-256. A copy already there (archived by :func:`archive_run`) is kept when its run folder is gone,
    provided its SHA-256 is the scored one (``expected``: "<arm>_s<seed>" -> SHA-256)."""
    copied = {}
    for arm, seed in runs:
        key = f"{arm}_s{seed}"
        source = study.run_dir(runs_dir, arm, seed) / "final"
        target = Path(dest) / key
        if not (source / "model.safetensors").exists() and (target / "model.safetensors").exists():
            copied[key] = sha256(target / "model.safetensors")
        else:
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors"):
                shutil.copyfile(source / name, target / name)
            copied[key] = sha256(target / "model.safetensors")
        if expected and key in expected and copied[key] != expected[key]:
            raise SystemExit(f"{target}: SHA-256 {copied[key][:16]} is not the scored model's {expected[key][:16]}; "
                             f"re-archive the run (its run folder holds the scored model)")
    return copied


def run_folder(study: "Study", runs_dir: Path, records: Optional[Path], name: str, seed: int) -> Path:
    """Where a run's records are read from: its committed archive when complete, else its run folder."""
    if records is not None and study.complete(archived(records, name, seed), name, seed):
        return archived(records, name, seed)
    return study.run_dir(runs_dir, name, seed)


def run_codes(out: Path, train: dict, score: dict) -> List[dict]:
    """Every code version that touched a run: each start or resumption of its training (``run_config.json``'s
    ``code_history``, or its ``code``), the one that finished it, and the one that scored it."""
    record = read_json(out / "run_config.json") or {}
    history = record.get("code_history") or ([record["code"]] if record.get("code") else [])
    return [c for c in history + [train.get("code") or {}, score.get("code") or {}] if isinstance(c, dict)]


def collect(study: "Study", runs_dir: Path, records: Optional[Path] = None) -> Dict[Tuple[str, int], dict]:
    """One entry per scored run: accuracies, provenance, costs and (under ``_flags``) the per-image flags."""
    runs = {}
    for name, seed in study.schedule:
        out = run_folder(study, runs_dir, records, name, seed)
        train, score = read_json(out / "train_record.json"), read_json(out / "score.json")
        if train is None or score is None:
            continue
        extra = {f[:-5]: read_json(out / f) for f in study.wanted(name, seed)[2:]}
        matched = extra.get("matched")
        runs[(name, seed)] = {
            "arm": name, "seed": seed, "natural": score["natural"], "worst_case": score["worst_case"],
            "matched_worst_case": matched["worst_case"] if matched else None, "n": score["n"],
            "gradient_masking_suspected": score["gradient_masking_suspected"],
            "failed_checks": score["failed_checks"], "families": score["families"],
            "commit": train["code"]["commit"], "score_commit": score["code"]["commit"],
            "commits": sorted({str(c.get("commit")) if c.get("commit") else None for c in run_codes(out, train, score)},
                              key=str),
            "dirty": any(c.get("dirty") for c in run_codes(out, train, score)), "model_sha256": score["model_sha256"],
            "train_seconds": train["seconds"], "validation_seconds": train.get("validation_seconds"),
            "score_seconds": score["seconds"] + sum(
                (e or {}).get("seconds") or 0 for e in extra.values()),
            "steps": train["steps"], "history": train["history"],
            **{k: {kk: vv for kk, vv in v.items() if kk != "per_example"} if isinstance(v, dict) else v
               for k, v in extra.items() if k in ("saturation", "echo")},
            "autoattack": ({k: {kk: vv for kk, vv in r.items() if kk != "per_example"}
                            for k, r in extra["autoattack"]["rows"].items()} | {
                               "union_on_these": extra["autoattack"]["union_on_these"],
                               "union_and_these": extra["autoattack"]["union_and_these"],
                               "n": extra["autoattack"]["n"]}) if extra.get("autoattack") else None,
            "_flags": {"worst_case": [bool(f) for f in score["per_example"]["worst_case"]],
                       "natural": [bool(f) for f in score["per_example"]["natural"]],
                       "matched": [bool(f) for f in matched["per_example"]] if matched else None}}
    return runs


__all__ = ["archive_run", "archived", "collect", "copy_selected_models", "run_codes", "run_folder"]
