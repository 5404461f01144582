"""How a study runs: its design as data (:class:`Arm`, :class:`Study`), the work queue (several worker processes,
each run claimed by an atomic mkdir, a dead worker's claim taken over, training resumed from its checkpoint), each
run's training and scoring records (commit, SHA-256 of the selected weights, seconds), and a study script's command
line. What it hands on lives beside it, one concern a module: the scoring (:mod:`studies._scoring`), the records on
disk (:mod:`studies._records`), the archive of finished runs (:mod:`studies._archive`) and the judgement and report
(:mod:`studies._report`).

Why shared: every study runs, scores and judges the same way, so a number in one study means what it means in
another. Studies import these modules as ``studies._protocol``, ``studies._scoring``, ... (run them as modules from
the repository root: ``python -m studies.<name>.study``); nothing here imports a study.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from studies._archive import archive_run, archived
from studies._records import read_json, sha256, write_json
from studies._report import report, write_rule
from studies._scoring import EPS, score_autoattack, score_echo, score_matched, score_saturation, score_union


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


__all__ = ["Arm", "Study", "claim", "cli", "score_run", "train_run", "train_timed", "training_record", "work"]
