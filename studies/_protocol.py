"""What casify's studies share: the scoring (the adaptive union, AutoAttack and Square, matched attacks, restart
saturation, the routing echo), the per-run records (commit, SHA-256 of the selected weights, seconds), the work queue
(several worker processes, each run claimed by an atomic mkdir, a dead worker's claim taken over, training resumed
from its checkpoint) and the judgement (:data:`casify.evaluate.compare.CROSSED_SEED_RULE`, Holm over the family).

Why one module: every study scores and judges the same way, so a number in one study means what it means in another.
Studies import it as ``studies._protocol`` (run them as modules from the repository root: ``python -m
studies.<name>.study``); nothing here imports a study.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

STUDIES = Path(__file__).resolve().parent
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


def results_of(study: str) -> Path:
    """``studies/<study>/results``: where a study's committed results live, so one study reads another's from its
    folder rather than through the other's script."""
    return STUDIES / study / "results"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, record) -> None:
    """Atomically: a killed worker never leaves half a record."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def claim(out: Path, name: str = ".claim") -> bool:
    """Take the run (or one job of it) for this process: an atomic mkdir; a claim whose process is gone is taken
    over (training then resumes from the run's last checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    mine = out / f"{name}.{os.getpid()}"
    mine.mkdir(exist_ok=True)
    (mine / "pid").write_text(str(os.getpid()))  # the claim is complete before it is visible
    try:
        os.rename(mine, path)  # atomic: fails when another claim is in place
        return True
    except OSError:
        pass
    try:
        pid = int((path / "pid").read_text())
    except (OSError, ValueError):  # a claim being replaced right now: leave it to its taker
        shutil.rmtree(mine, ignore_errors=True)
        return False
    if pid == os.getpid():
        shutil.rmtree(mine, ignore_errors=True)
        return True
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:  # a live process of another user
        alive = True
    if alive:
        shutil.rmtree(mine, ignore_errors=True)
        return False
    shutil.rmtree(path, ignore_errors=True)  # its claimer died: take over (training resumes from its checkpoint)
    try:
        os.rename(mine, path)
        return True
    except OSError:  # another worker took it over first
        shutil.rmtree(mine, ignore_errors=True)
        return False


def train_timed(trainer, out: Path) -> Tuple[object, float, float]:
    """Train (resuming from the run's checkpoints); the wall-clock seconds summed over every resumption, and of
    them the seconds spent on held-out validation (the same for every arm of a study: a training-cost comparison
    leaves it out)."""
    partial = out / "train_seconds_partial.json"
    before = read_json(partial) or {}
    prior, prior_val = before.get("seconds", 0.0), before.get("validation_seconds", 0.0)
    start = time.time()
    spent = {"validation": 0.0}
    every = max(1, int(trainer.config.checkpoint_every_steps or 1))
    validate = trainer.validate

    def timed_validate(*args, **kwargs):  # instrumentation of this study's trainer only
        began = time.time()
        try:
            return validate(*args, **kwargs)
        finally:
            spent["validation"] += time.time() - began

    def save_seconds(tr):
        if tr.state.global_step % every == 0:
            write_json(partial, {"seconds": prior + time.time() - start,
                                 "validation_seconds": prior_val + spent["validation"]})

    trainer.validate = timed_validate
    trainer.callbacks.append(save_seconds)
    state = trainer.train(resume=True)
    return state, prior + time.time() - start, prior_val + spent["validation"]


@dataclass
class Arm:
    """One training arm of a study: the method, the defense (None: plain), its layers, options and loss settings."""
    method: str = "at"
    defense: Optional[str] = None
    layers: List[str] = field(default_factory=list)
    options: Dict = field(default_factory=dict)
    layer_options: Dict = field(default_factory=dict)
    beta: float = 2.0
    loss_kwargs: Dict = field(default_factory=dict)
    init: Optional[str] = None

    @property
    def defended(self) -> bool:
        return bool(self.layers)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def training_record(arm_name: str, seed: int, state, seconds: float, folder: Path, config,
                    validation_seconds: Optional[float] = None) -> dict:
    from casify.core.code_version import code_version
    return {"arm": arm_name, "seed": seed, "seconds": round(seconds, 1),
            "validation_seconds": None if validation_seconds is None else round(validation_seconds, 1),
            "steps": state.global_step,
            "best_step": state.best_step, "history": state.history, "selected_folder": folder.name,
            "model_sha256": sha256(folder / "model.safetensors"), "config": config.to_dict(),
            "code": code_version(), "torch": torch.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads()}


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


@dataclass
class Study:
    """A study's design, as data its script fills in: the arms, the order runs are taken in, how a run's model, data
    and TrainConfig are built, and which extra scores each arm gets (file name -> arms). The selected model of every
    run is its last step (``final/``): the same selection for every arm, never a test-set choice."""
    name: str
    arms: Dict[str, Arm]
    schedule: List[Tuple[str, int]]
    build_model: Callable  # (arm name, arm, seed) -> wrapped model
    datasets: Callable  # (arm name) -> (train, val); built once per data_key
    test_set: Callable  # (arm name) -> test dataset (test846)
    train_config: Callable  # (arm name, arm, seed, out) -> TrainConfig
    # file ("matched.json", "saturation.json", "autoattack.json", "echo.json") -> which (arm, seed) runs get it
    extras: Dict[str, Callable[[str, int], bool]] = field(default_factory=dict)
    # a study's own scores: file -> fn(model, test, union, arm name) -> record (asked for through ``extras`` too)
    custom_jobs: Dict[str, Callable] = field(default_factory=dict)
    eps: Callable[[str], float] = lambda name: EPS  # the radius an arm is trained and scored at (pixels, L-inf)
    data_key: Callable[[str], str] = lambda name: "data"  # arms with one key share one (train, val) pair
    # what a run needs before its model is built, e.g. a natural fine-tune shared by every arm of a seed:
    # fn(arm name, arm, seed, run folder, (train, val)); it may leave JSON records in the run folder (archived with it)
    prepare: Optional[Callable] = None

    def run_dir(self, runs_dir: Path, arm: str, seed: int) -> Path:
        return Path(runs_dir) / f"{arm}_s{seed}"

    def wanted(self, arm: str, seed: int) -> List[str]:
        return ["train_record.json", "score.json"] + [f for f, gets in self.extras.items() if gets(arm, seed)]

    def complete(self, folder: Path, arm: str, seed: int) -> bool:
        return all((Path(folder) / f).exists() for f in self.wanted(arm, seed))

    def done(self, runs_dir: Path, arm: str, seed: int, records: Optional[Path] = None) -> bool:
        """Every record the run owes exists, in its run folder or (``records``) in the study's committed archive."""
        return (self.complete(self.run_dir(runs_dir, arm, seed), arm, seed)
                or records is not None and self.complete(archived(records, arm, seed), arm, seed))


def archived(records: Path, arm: str, seed: int) -> Path:
    """``<records>/runs/<arm>_s<seed>``: a finished run's committed records (see :func:`archive_run`)."""
    return Path(records) / "runs" / f"{arm}_s{seed}"


def archive_run(study: Study, runs_dir: Path, records: Path, name: str, seed: int) -> Path:
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


def train_run(study: Study, runs_dir: Path, name: str, seed: int, data) -> None:
    from casify.train import Trainer
    out = study.run_dir(runs_dir, name, seed)
    if (out / "train_record.json").exists():
        return
    arm = study.arms[name]
    cfg = study.train_config(name, arm, seed, out)
    if study.prepare is not None:
        study.prepare(name, arm, seed, out, data)
    trainer = Trainer(study.build_model(name, arm, seed), *data, cfg, identity={"study": study.name, "arm": name})
    print(f"[train] {name} s{seed}: {trainer.total_steps} steps", flush=True)
    state, seconds, validation = train_timed(trainer, out)
    write_json(out / "train_record.json", training_record(name, seed, state, seconds, out / "final", cfg, validation))
    print(f"[train] {name} s{seed}: {seconds:.0f}s", flush=True)


def score_run(study: Study, runs_dir: Path, name: str, seed: int) -> None:
    """Every score the arm gets, each its own file (a killed worker resumes at the first one missing)."""
    import casify
    out = study.run_dir(runs_dir, name, seed)
    arm = study.arms[name]
    folder = out / "final"
    sha = sha256(folder / "model.safetensors")
    model = casify.from_pretrained(folder).eval()
    test = study.test_set(name)
    eps = study.eps(name)
    if not (out / "score.json").exists():
        write_json(out / "score.json", score_union(model, test, arm.defended, sha, eps))
    union = read_json(out / "score.json")
    print(f"[score] {name} s{seed}: natural {union['natural']:.3f} worst {union['worst_case']:.3f}", flush=True)
    jobs = {"matched.json": lambda: score_matched(model, test, arm.defended, union, eps),
            "saturation.json": lambda: score_saturation(model, test, arm.defended, union, eps),
            "autoattack.json": lambda: score_autoattack(model, test, union, eps=eps),
            "echo.json": lambda: score_echo(model, test, arm.beta, sha, eps),
            **{file: (lambda fn=fn: fn(model, test, union, name)) for file, fn in study.custom_jobs.items()}}
    for file in study.wanted(name, seed):
        if file in jobs and not (out / file).exists():
            write_json(out / file, jobs[file]())
            print(f"[score] {name} s{seed}: {file}", flush=True)


def work(study: Study, runs_dir: Path, only: Sequence[str] = (), records: Optional[Path] = None,
         stop_after: Optional[float] = None) -> None:
    """One worker: take the schedule's runs in order, skipping finished ones (archived in ``records`` too) and those
    another live worker holds; archive each run it finishes into ``records``. ``stop_after`` (seconds from now): no
    new run is taken after it, so a session that ends soon does not start a run it cannot finish."""
    data = {}
    started = time.time()
    for name, seed in study.schedule:
        if only and name not in only or records is not None and study.complete(archived(records, name, seed),
                                                                                name, seed):
            continue
        if study.done(runs_dir, name, seed):
            if records is not None:  # finished here, not archived yet
                archive_run(study, runs_dir, records, name, seed)
            continue
        if stop_after is not None and time.time() - started > stop_after:
            print(f"[stop] {stop_after / 60:.0f} minutes passed: no new run taken", flush=True)
            return
        if not claim(study.run_dir(runs_dir, name, seed)):
            continue
        key = study.data_key(name)
        out = study.run_dir(runs_dir, name, seed)
        try:
            if key not in data:
                data[key] = study.datasets(name)
            train_run(study, runs_dir, name, seed, data[key])
            score_run(study, runs_dir, name, seed)
            if records is not None:
                print(f"[archive] {name} s{seed}: {archive_run(study, runs_dir, records, name, seed)}", flush=True)
        except Exception as e:  # one broken run must not stop the queue: recorded, and the worker goes on
            write_json(out / "error.json", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                                            "time": time.time()})
            print(f"[error] {name} s{seed}: {type(e).__name__}: {e} (recorded in {out / 'error.json'}; next run)",
                  flush=True)


def run_codes(out: Path, train: dict, score: dict) -> List[dict]:
    """Every code version that touched a run: each start or resumption of its training (``run_config.json``'s
    ``code_history``, or its ``code``), the one that finished it, and the one that scored it."""
    record = read_json(out / "run_config.json") or {}
    history = record.get("code_history") or ([record["code"]] if record.get("code") else [])
    return [c for c in history + [train.get("code") or {}, score.get("code") or {}] if isinstance(c, dict)]


def run_folder(study: Study, runs_dir: Path, records: Optional[Path], name: str, seed: int) -> Path:
    """Where a run's records are read from: its committed archive when complete, else its run folder."""
    if records is not None and study.complete(archived(records, name, seed), name, seed):
        return archived(records, name, seed)
    return study.run_dir(runs_dir, name, seed)


def collect(study: Study, runs_dir: Path, records: Optional[Path] = None) -> Dict[Tuple[str, int], dict]:
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


def cli(argv, description: str, make_study: Callable, rule: Callable, *, results: Path, models: Path,
        comparisons: Dict[str, Tuple[str, str]], title: str, module: str, runs_dir: str,
        extra_args: Sequence[Tuple[str, dict]] = (), annotate: Optional[Callable] = None,
        extend: Optional[Callable] = None) -> None:
    """A study script's command line: ``--init`` (the rule), ``--work`` (one worker), ``--report``."""
    import argparse
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--init", action="store_true", help="write the decision rule (once, before the first run)")
    p.add_argument("--work", action="store_true", help="be one worker of the study's queue")
    p.add_argument("--report", action="store_true", help="judge what exists and write the report")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--runs-dir", default=runs_dir)
    p.add_argument("--only", nargs="*", default=(), help="work on these arms only")
    p.add_argument("--records", default=str(results.parent),
                   help="the study's folder in the checkout that keeps its records (runs/ and models/ are written "
                        "there as runs finish; a worker in a pinned worktree names main's folder)")
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="take no new run after this many minutes (a session about to end)")
    for flag, kwargs in extra_args:
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    if args.init:
        print(f"wrote {write_rule(results, rule())}")
    if args.work:
        torch.set_num_threads(1)
        work(make_study(args), Path(args.runs_dir), args.only, records=Path(args.records),
             stop_after=None if args.stop_after_minutes is None else 60 * args.stop_after_minutes)
    if args.report:
        report(make_study(args), Path(args.runs_dir), results, models, comparisons, title, module, annotate, extend,
               records=Path(args.records))


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
    return "\n".join(list(extra) + [""] + lines if extra else lines)


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


__all__ = ["AA_EXAMPLES", "Arm", "archive_run", "archived", "ECHO", "EPS", "SATURATION", "claim", "comparison", "interval", "judge", "pct",
           "read_json", "results_of", "score_autoattack", "score_echo", "score_matched", "score_saturation",
           "score_union", "sha256", "train_timed", "training_record", "union_attacks", "write_json"]
