"""Training throughput: does casify's Trainer cost anything, does torch.compile pay, can the data loader keep up?

Why this exists: the Trainer wraps an AT+CAS step in bookkeeping (Accelerate's prepared model, optimizer and loader,
per-item seeded augmentation, an LR set every step, metrics gathered every step, callbacks). The issue asks that this
costs at most 5 % of throughput against a bare hand-written loop doing the same work, how much ``train.compile`` and
``train.channels_last`` give, and whether decoding and augmenting JPEGs keeps up with the step. Three parts:

1. images/s of an AT+CAS step (PGD-3 in eval mode with predicted routing, update in train mode routed by the labels)
   through ``casify.train.Trainer`` and through a bare loop: same model, attack, SGD, batch and synthetic in-memory data.
   Steady state only: the time between consecutive optimizer steps (a Trainer callback stamps each one), within an
   epoch, after a warm-up epoch; construction, the first step of each epoch and the Trainer's end-of-run save are left
   out of both.
2. the same Trainer eager, eager + channels_last, compiled (inductor, cold cache) and compiled + channels_last, with
   the time of the first step (which holds the compilation).
3. decode + augment images/s of an ImageFolder of generated JPEGs through ``casify.data.imagefolder_dataset`` and a
   DataLoader (0 and 2 workers), raw and wrapped the way the Trainer wraps it (``EpochSeededDataset``), against what the
   step consumes; the markdown sizes an 8-GPU ImageNet ResNet-152 run from it.

Each part runs its variants round-robin (the order rotated every round) and reports medians over rounds with the
spread, so background load on a shared machine falls on every variant alike; each rate is given per wall-clock second
and per CPU-second of this process (the second barely moves under other processes' load). In part 1 a ``bare_seeded``
loop (the bare loop over ``EpochSeededDataset``) and a cProfile of one epoch of each loop attribute the difference.

    python benchmarks/train_throughput.py --out benchmarks/results          # ~8 min on an idle 2-core CPU, 1 thread
    python benchmarks/train_throughput.py --quick --out /tmp/train_tp       # ~1 min smoke run (compile: eager backend)
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import casify
from casify.data import EpochSeededDataset, imagefolder_dataset, imagenet_train_transform
from casify.losses import get_loss
from casify.train import Trainer, TrainConfig

GOAL_RATIO = 0.95  # the issue: Trainer / bare loop >= 0.95 on CPU

# Published figures for the 8-GPU ImageNet estimate (none measured here: no GPU was lent to this work).
GPU_REFERENCE = {
    "resnet50_train_img_s_a100_amp": 2470,
    "resnet50_train_img_s_a100_amp_source": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5 "
                                            "README, 'Training performance: NVIDIA DGX A100 (8x A100 80GB)', 1 GPU, "
                                            "mixed precision, pytorch-21.03 NGC container",
    "resnet152_over_resnet50_train": round(501.44 / 1218.01, 3),
    "resnet152_over_resnet50_source": "timm results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv: resnet152 "
                                      "501.44 vs resnet50 1218.01 train samples/s (RTX 3090, AMP, NHWC)",
    "at_pgd3_cost_factor": [3.0, 4.0],
    "at_pgd3_cost_factor_note": "a PGD-3 AT step over a standard step: each attack step is a forward plus an "
                                "input-only backward (~2 forward-equivalents, no weight gradients), the update a "
                                "forward + backward (~3): (3*2+3)/3 = 3; recipes/configs/imagenet_resnet152_at_cas.yaml "
                                "states ~4x (a full backward per attack step)",
}


# ------------------------------------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    import accelerate
    import torchvision
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "accelerate": accelerate.__version__, "casify": casify.__version__,
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "casify_revision": casify_revision()}


def casify_revision() -> dict:
    """The commit the measured casify comes from, and its files that differ from it (others edit the same tree)."""
    root = Path(casify.__file__).resolve().parent.parent

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted_casify_files": [l[3:] for l in git("status", "--porcelain", "--", "casify").splitlines()]}


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------- statistics

def spread(values: List[float]) -> dict:
    """Median with min, max and quartiles (over rounds)."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2],
            "n": len(values)}


def paired_ratio(a: List[float], b: List[float]) -> dict:
    """Round-by-round ratio a/b (the two ran back to back in each round), summarised over rounds."""
    return spread([x / y for x, y in zip(a, b)])


def interleave(variants: Dict[str, Callable[[], float]], rounds: int, on_error: Optional[dict] = None,
               log: Callable[[str], None] = print) -> Dict[str, List[float]]:
    """Call each variant once per round, the order rotated every round; return each variant's values in round order.

    A variant that raises is dropped from later rounds and its error recorded in ``on_error``.
    """
    names = list(variants)
    values: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if on_error is not None and name in on_error:
                continue
            try:
                values[name].append(variants[name]())
            except Exception as exc:  # e.g. inductor without a working C++ compiler
                if on_error is None:
                    raise
                on_error[name] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                log(f"  {name} failed: {on_error[name][:300]}")
                continue
            log(f"  round {r} {name}: {values[name][-1]:.1f}")
    return values


# --------------------------------------------------------------------------------------------- part 1 and 2: training

def build_model(width: float, seed: int) -> casify.DefendedModel:
    torch.manual_seed(seed)
    base = timm.create_model("cifar_resnet18", num_classes=10, width=width)
    return casify.wrap(base, ["layer4.0", "layer4.1"], init="paper", normalize=None, input_size=(3, 32, 32))


def synthetic_dataset(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def sgd(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The Trainer's optimizer: no weight decay on biases and norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum)


class Loop:
    """One way of training; ``epoch()`` runs one epoch and returns its steady-state images/s.

    ``stamps`` holds the wall time after every optimizer step of the last epoch, ``cpu_stamps`` this process's CPU
    time; the steady-state rate counts the steps between the first and the last stamp, so the first step of an epoch
    (loader start-up) is left out. ``cpu_rate`` is images per CPU-second of this process: unlike the wall rate it
    hardly moves when other processes take the cores, so it shows a systematic overhead through background load.
    """
    name = ""

    def __init__(self, batch: int):
        self.batch = batch
        self.stamps: List[float] = []
        self.cpu_stamps: List[float] = []
        self.cpu_rate = 0.0
        self.epoch_start = 0.0
        self.first_epoch: Optional[dict] = None

    def stamp(self, *_) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def run_epoch(self) -> None:
        raise NotImplementedError

    def epoch(self) -> float:
        self.stamps, self.cpu_stamps = [], []
        self.epoch_start = time.perf_counter()
        self.run_epoch()
        if self.first_epoch is None:
            self.first_epoch = {"first_step_s": self.stamps[0] - self.epoch_start,
                                "epoch_s": self.stamps[-1] - self.epoch_start, "steps": len(self.stamps)}
        self.cpu_rate = self.batch * (len(self.stamps) - 1) / (self.cpu_stamps[-1] - self.cpu_stamps[0])
        return self.batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])

    def step_times(self) -> List[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


class BareLoop(Loop):
    """The reference: a hand-written loop doing what a Trainer step does, nothing else."""
    name = "bare"

    def __init__(self, model, dataset, batch: int, lr: float, attack, loss_fn, seed: int):
        super().__init__(batch)
        self.model, self.attack, self.loss_fn = model, attack, loss_fn
        self.optimizer = sgd(model, lr)
        self.loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))

    def run_epoch(self) -> None:
        for x, y in self.loader:
            x_adv = self.attack(self.model, x, y)  # eval mode, each CAS module routed by its own prediction
            self.model.train()
            loss, _ = self.loss_fn(self.model, x, x_adv, y)  # routed by the labels
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.stamp()


class TrainerLoop(Loop):
    """casify's Trainer; every ``epoch()`` extends the run by one epoch and calls ``train()`` again (it resumes from
    its own state: same run record, no checkpoints), so one Trainer, and one compilation, serves every round."""

    def __init__(self, name: str, model, dataset, batch: int, lr: float, output_dir: str, seed: int, **train_kwargs):
        super().__init__(batch)
        self.name = name
        self.config = TrainConfig(method="at", cas=True, eps=8 / 255, attack_steps=train_kwargs.pop("attack_steps"),
                                  attack_alpha=2 / 255, epochs=1.0, batch_size=batch, lr=lr, schedule="constant",
                                  seed=seed, num_workers=0, progress=False, output_dir=output_dir, **train_kwargs)
        t = time.perf_counter()
        self.trainer = Trainer(model, dataset, None, self.config, callbacks=[self.stamp])
        self.construct_s = time.perf_counter() - t

    def run_epoch(self) -> None:
        if self.trainer.state.global_step:
            self.trainer.total_steps += self.trainer.steps_per_epoch
        self.trainer.train(resume=True)


def dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
        return {k: int(v) for k, v in counters["stats"].items()}
    except Exception:
        return {}


def training_variants(args, template, dataset, workdir: Path) -> Dict[str, Loop]:
    """Every loop, each on its own copy of the same initial weights. ``bare_seeded`` is a diagnostic: the bare loop
    over the Trainer's data path (``EpochSeededDataset``), to separate that cost from the rest of the Trainer's."""
    loss_fn = get_loss("at", cas=True)
    attack = loss_fn.training_attack(eps=8 / 255, steps=args.attack_steps, alpha=2 / 255)
    loops: Dict[str, Loop] = {}
    for name, data in (("bare", dataset), ("bare_seeded", EpochSeededDataset(dataset, args.seed))):
        loops[name] = BareLoop(copy.deepcopy(template), data, args.batch, args.lr, attack, loss_fn, args.seed)
        loops[name].name = name
    settings = {"trainer": {}, "trainer_channels_last": {"channels_last": True}}
    if args.compile_backend != "none":
        settings["trainer_compiled"] = {"compile": True, "compile_backend": args.compile_backend}
        settings["trainer_compiled_channels_last"] = {"compile": True, "compile_backend": args.compile_backend,
                                                      "channels_last": True}
    for name, extra in settings.items():
        loops[name] = TrainerLoop(name, copy.deepcopy(template), dataset, args.batch, args.lr, str(workdir / name),
                                  args.seed, attack_steps=args.attack_steps, **extra)
        assert loops[name].trainer.attack.to_dict() == attack.to_dict(), "the Trainer must run the bare loop's attack"
    return loops


def run_part(loops: Dict[str, Loop], names: List[str], rounds: int, errors: dict, log) -> Dict[str, dict]:
    """One warm-up round (it holds any compilation) then ``rounds`` measured rounds of ``names``, interleaved.
    Per variant: its steady-state images/s per round and every steady step's time."""
    steps: Dict[str, List[List[float]]] = {n: [] for n in names}
    cpu_rates: Dict[str, List[float]] = {n: [] for n in names}

    def measure(loop: Loop) -> float:
        rate = loop.epoch()
        steps[loop.name].append(loop.step_times())
        cpu_rates[loop.name].append(loop.cpu_rate)
        return rate

    rates = interleave({n: (lambda loop=loops[n]: measure(loop)) for n in names}, rounds + 1, on_error=errors, log=log)
    return {n: {"rates": rates[n][1:], "cpu_rates": cpu_rates[n][1:],
                "steps": [t for epoch in steps[n][1:] for t in epoch]}
            for n in names if n not in errors and len(rates[n]) > 1}


def summarise_part(loops: Dict[str, Loop], measured: Dict[str, dict], batch: int) -> dict:
    out = {}
    for name, m in measured.items():
        step = spread([1e3 * t for t in m["steps"]])
        out[name] = {"images_per_s": spread(m["rates"]), "images_per_s_by_round": [round(v, 2) for v in m["rates"]],
                     "images_per_cpu_s": spread(m["cpu_rates"]),
                     "step_ms": step, "images_per_s_from_median_step": batch / (step["median"] / 1e3),
                     "first_epoch": loops[name].first_epoch}
        if isinstance(loops[name], TrainerLoop):
            out[name]["construct_s"] = loops[name].construct_s
    return out


def ratios(measured: Dict[str, dict], summary: dict, pairs: Dict[str, tuple]) -> dict:
    """images/s of a over b: of the medians over rounds, round by round (paired), and of the median step times."""
    out = {}
    for label, (a, b) in pairs.items():
        if a not in summary or b not in summary:
            out[label] = None
            continue
        out[label] = {"of_medians": summary[a]["images_per_s"]["median"] / summary[b]["images_per_s"]["median"],
                      "paired_by_round": paired_ratio(measured[a]["rates"], measured[b]["rates"]),
                      "of_median_step_times": summary[b]["step_ms"]["median"] / summary[a]["step_ms"]["median"],
                      "of_median_cpu_rates": summary[a]["images_per_cpu_s"]["median"] /
                                             summary[b]["images_per_cpu_s"]["median"],
                      "cpu_paired_by_round": paired_ratio(measured[a]["cpu_rates"], measured[b]["cpu_rates"])}
    return out


def compile_costs(summary: dict, batch: int) -> dict:
    """Compilation time (first step minus a steady step) and the steps it takes to pay for itself."""
    eager = summary.get("trainer")
    out = {}
    for order, name in enumerate(("trainer_compiled", "trainer_compiled_channels_last")):
        s = summary.get(name)
        if not s or not eager:
            continue
        step_s = batch / s["images_per_s"]["median"]
        saving = batch / eager["images_per_s"]["median"] - step_s
        compile_s = s["first_epoch"]["first_step_s"] - step_s
        out[name] = {"first_step_s": s["first_epoch"]["first_step_s"], "compile_s": compile_s,
                     "eager_first_step_s": eager["first_epoch"]["first_step_s"], "steady_step_saving_s": saving,
                     "break_even_steps": compile_s / saving if saving > 0 else None,
                     "inductor_cache": "cold" if order == 0 else
                                       "cold on disk, but after trainer_compiled in the same process (its kernels reused)"}
    return out


def data_path_ms(loops: Dict[str, Loop], dataset, batch: int, seed: int, rounds: int) -> dict:
    """ms per batch of iterating each data path alone: the bare DataLoader, the same over EpochSeededDataset, and the
    Trainer's prepared loader (Accelerate's DataLoaderShard over EpochSeededDataset)."""
    def per_batch(iterable) -> float:
        t = time.perf_counter()
        n = sum(1 for _ in iterable)
        return 1e3 * (time.perf_counter() - t) / n

    paths = {"bare_loader": loops["bare"].loader, "epoch_seeded_loader": loops["bare_seeded"].loader,
             "trainer_loader": loops["trainer"].trainer.train_loader}
    values = interleave({k: (lambda dl=dl: per_batch(dl)) for k, dl in paths.items()}, rounds + 1, log=lambda m: None)
    return {"ms_per_batch": {k: spread(v[1:]) for k, v in values.items()}, "batch": batch}


# ------------------------------------------------------------------------------------------------------- profiling

# Phases of a step: where each loop spends it (path suffix of the file, function name; cumulative time). The Trainer
# reaches the same torch calls through Accelerate's wrappers, so each phase names the outermost call of each loop.
PHASES = {
    "data: next batch (DataLoader __next__)": {"trainer": ("torch/utils/data/dataloader.py", "__next__"),
                                              "bare": ("torch/utils/data/dataloader.py", "__next__")},
    "  of which EpochSeededDataset.__getitem__": {"trainer": ("casify/data.py", "__getitem__")},
    "attack (casify.attacks.pgd)": {"trainer": ("casify/attacks/pgd.py", "pgd"), "bare": ("casify/attacks/pgd.py", "pgd")},
    "loss forward (AdversarialLoss.__call__)": {"trainer": ("casify/losses.py", "__call__"),
                                                "bare": ("casify/losses.py", "__call__")},
    "backward (Accelerator.backward / Tensor.backward)": {"trainer": ("accelerate/accelerator.py", "backward"),
                                                          "bare": ("torch/_tensor.py", "backward")},
    "optimizer step (AcceleratedOptimizer.step / SGD.step)": {"trainer": ("accelerate/optimizer.py", "step"),
                                                              "bare": ("torch/optim/sgd.py", "step")},
    "zero_grad": {"trainer": ("torch/optim/optimizer.py", "zero_grad"),
                  "bare": ("torch/optim/optimizer.py", "zero_grad")},
    "metrics: gather_for_metrics": {"trainer": ("accelerate/accelerator.py", "gather_for_metrics")},
    "accelerate: accumulate + autocast contexts": {"trainer": ("accelerate/accelerator.py", ("accumulate", "autocast"))},
    "trainer: _set_lr": {"trainer": ("casify/train/loop.py", "_set_lr")},
}


def _cumulative(stats: pstats.Stats, suffix: str, funcs) -> float:
    funcs = (funcs,) if isinstance(funcs, str) else funcs
    return sum(v[3] for (path, _, name), v in stats.stats.items()
               if name in funcs and path.replace("\\", "/").endswith(suffix))


def profile_epoch(loop: Loop, role: str) -> dict:
    """cProfile one epoch of ``loop``: wall and per-phase cumulative time per step (ms), plus the top functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    loop.epoch()
    profiler.disable()
    stats = pstats.Stats(profiler)
    steps = len(loop.stamps)
    phases = {label: round(1e3 * _cumulative(stats, *where[role]) / steps, 3)
              for label, where in PHASES.items() if role in where}
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(12)
    top = [line.strip() for line in buf.getvalue().splitlines() if line.strip()][-13:]
    wall = 1e3 * (loop.stamps[-1] - loop.epoch_start) / steps
    outer = sum(v for k, v in phases.items() if not k.startswith(" "))
    phases["rest of the loop (wall minus the phases above)"] = round(wall - outer, 3)
    return {"steps": steps, "wall_ms_per_step": round(wall, 3), "phases_ms_per_step": phases,
            "top_by_own_time": top}


def overhead_attribution(bare: dict, trainer: dict) -> List[dict]:
    """Per phase: ms per step in each loop and the difference, in PHASES order."""
    labels = list(trainer["phases_ms_per_step"])
    rows = [{"where": k, "trainer_ms": trainer["phases_ms_per_step"].get(k, 0.0),
             "bare_ms": bare["phases_ms_per_step"].get(k, 0.0)} for k in labels]
    for r in rows:
        r["difference_ms"] = round(r["trainer_ms"] - r["bare_ms"], 3)
    return rows


# ------------------------------------------------------------------------------------------------ part 3: data loading

def write_jpegs(root: Path, n: int, size: tuple, classes: int, seed: int, noise: float = 22.0) -> dict:
    """``n`` JPEGs of ``size`` (w, h) in ``classes`` folders: smooth random colour fields plus grain, so they compress
    like photographs rather than like noise (at 500x375 about 110 KB each, ImageNet's mean file size: its 138 GB
    training tar over 1.28 M files). Returns the mean file size."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    sizes = []
    for i in range(n):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return {"images": n, "size_wh": list(size), "classes": classes, "mean_kb": round(statistics.mean(sizes) / 1e3, 1),
            "jpeg_quality": 90}


def loader(dataset, batch: int, workers: int, seed: int) -> DataLoader:
    kwargs = {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "shuffle": True, "drop_last": True,
              "generator": torch.Generator().manual_seed(seed)}
    if workers:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(dataset, batch_size=batch, **kwargs)


def loader_pass(dl: DataLoader, passes: int = 1) -> float:
    """Images/s of ``passes`` full passes (decode + augment + collate), each pipeline start included."""
    t = time.perf_counter()
    count = 0
    for _ in range(passes):
        for x, _ in dl:
            count += x.shape[0]
    return count / (time.perf_counter() - t)


def data_loading(args, workdir: Path, log) -> dict:
    # cifar_like: what this benchmark's model eats (32x32); imagenet_like: ImageNet-sized files for the GPU estimate.
    # The small images decode ~20x faster, so each measurement makes 4 passes over them to last about as long.
    configs = {"cifar_like": {"size_wh": (64, 64), "crop": 32, "passes": 4},
               "imagenet_like": {"size_wh": (500, 375), "crop": 224, "passes": 1}}
    datasets, loaders, passes, meta = {}, {}, {}, {}
    for cfg_name, cfg in configs.items():
        root = workdir / cfg_name
        t = time.perf_counter()
        meta[cfg_name] = write_jpegs(root, args.images, cfg["size_wh"], classes=8, seed=args.seed)
        meta[cfg_name].update(crop=cfg["crop"], transform=f"imagenet_train_transform({cfg['crop']})",
                              passes_per_measurement=cfg["passes"], generate_s=round(time.perf_counter() - t, 2))
        raw = imagefolder_dataset(root, imagenet_train_transform(cfg["crop"]))
        datasets[f"{cfg_name}/raw"] = raw
        datasets[f"{cfg_name}/seeded"] = EpochSeededDataset(raw, args.seed)  # what the Trainer iterates
    for name, ds in datasets.items():
        for workers in args.workers:
            loaders[f"{name}/w{workers}"] = loader(ds, args.batch, workers, args.seed)
            passes[f"{name}/w{workers}"] = configs[name.split("/")[0]]["passes"]
    errors: dict = {}
    rates = interleave({k: (lambda dl=dl, n=passes[k]: loader_pass(dl, n)) for k, dl in loaders.items()},
                       args.data_rounds + 1, on_error=errors, log=log)
    out = {"datasets": meta, "batch": args.batch, "workers": args.workers,
           "loader_kwargs": {"pin_memory": torch.cuda.is_available(), "persistent_workers": "when workers > 0",
                             "prefetch_factor": "4 when workers > 0", "shuffle": True},
           "images_per_s": {k: spread(v[1:]) for k, v in rates.items() if len(v) > 1},
           "images_per_s_by_round": {k: [round(x, 1) for x in v[1:]] for k, v in rates.items()},
           "errors": errors}
    loaders.clear()  # the last references: their persistent workers stop
    gc.collect()
    return out


def gpu_estimate(data: dict) -> dict:
    """What an 8-GPU ImageNet ResNet-152 AT (PGD-3) run asks of the loader, from published figures (see GPU_REFERENCE)
    and this machine's measured per-core decode + augment rate."""
    ref = GPU_REFERENCE
    standard = ref["resnet50_train_img_s_a100_amp"] * ref["resnet152_over_resnet50_train"]
    per_gpu = [standard / f for f in reversed(ref["at_pgd3_cost_factor"])]  # low, high
    need = [8 * v for v in per_gpu]
    core = data["images_per_s"].get("imagenet_like/seeded/w0", {}).get("median")
    return {"gpu": "A100 80GB, mixed precision (estimate, not measured)",
            "resnet152_standard_train_img_s_per_gpu": round(standard),
            "resnet152_at_pgd3_img_s_per_gpu": [round(v) for v in per_gpu],
            "needed_img_s_8_gpus": [round(v) for v in need],
            "measured_img_s_per_core_224": core,
            "cores_needed_at_this_rate": [round(v / core, 1) for v in need] if core else None,
            "recipe_workers": "imagenet_resnet152_at_cas.yaml: num_workers 8 per process x 8 processes = 64 workers",
            "recipe_workers_img_s_at_this_rate": round(64 * core) if core else None,
            "references": ref}


# -------------------------------------------------------------------------------------------------------- reporting

def fmt(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def md_variants(part: dict) -> List[str]:
    lines = ["| variant | images/s: median over rounds | min-max over rounds | step ms: median (q1-q3) of all "
             "steady steps | images per CPU-second: median (min-max) | first step of the run, s |",
             "|---|---|---|---|---|---|"]
    for name, v in part["variants"].items():
        r, st, c = v["images_per_s"], v["step_ms"], v["images_per_cpu_s"]
        lines.append(f"| {name} | {r['median']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {st['median']:.0f} "
                     f"({st['q1']:.0f}-{st['q3']:.0f}) | {c['median']:.1f} ({c['min']:.1f}-{c['max']:.1f}) | "
                     f"{v['first_epoch']['first_step_s']:.2f} |")
    return lines


def md_ratios(part: dict) -> List[str]:
    lines = ["| ratio of images/s | of the medians | round by round: median (min-max) | of the median step times | "
             "per CPU-second: of the medians | per CPU-second, round by round: median (min-max) |",
             "|---|---|---|---|---|---|"]
    for name, r in part["ratios"].items():
        if r:
            p, c = r["paired_by_round"], r["cpu_paired_by_round"]
            lines.append(f"| {name} | {r['of_medians']:.3f} | {p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f}) | "
                         f"{r['of_median_step_times']:.3f} | {r['of_median_cpu_rates']:.3f} | {c['median']:.3f} "
                         f"({c['min']:.3f}-{c['max']:.3f}) |")
    return lines


def md_profile(part: dict) -> List[str]:
    prof = part.get("profile")
    if not prof:
        return []
    lines = ["", "Where the time goes (cProfile, one epoch of each loop, ms per step): "
                 f"{prof['note']}. Wall per step under the profiler: Trainer {prof['trainer']['wall_ms_per_step']:.0f} "
                 f"ms, bare {prof['bare']['wall_ms_per_step']:.0f} ms.", "",
             "| where | Trainer | bare | difference |", "|---|---|---|---|"]
    for row in prof["attribution"]:
        where = row["where"].replace("  of which", "&nbsp;&nbsp;of which")
        lines.append(f"| {where} | {row['trainer_ms']:.2f} | {row['bare_ms']:.2f} | {row['difference_ms']:+.2f} |")
    return lines


def md_compile(part: dict) -> List[str]:
    lines = ["", "| compiled variant | first step, s | compile, s | saving per steady step, s | break-even steps | "
                 "inductor cache |", "|---|---|---|---|---|---|"]
    for name, c in part["compile"].items():
        lines.append(f"| {name} | {c['first_step_s']:.1f} | {c['compile_s']:.1f} | {c['steady_step_saving_s']:.3f} | "
                     f"{fmt(c['break_even_steps'], 0)} | {c['inductor_cache']} |")
    return lines if part["compile"] else []


def md_data(result: dict) -> List[str]:
    data, env = result.get("data_loading"), result["environment"]
    if not data:
        return []
    lines = ["", f"## Data loading: decode + `imagenet_train_transform` + collate, batch {data['batch']}, "
                 f"{env['torch_threads']} torch thread per process", "",
             "| dataset | path | workers | images/s: median | min-max |", "|---|---|---|---|---|"]
    for name, r in data["images_per_s"].items():
        cfg, path, w = name.split("/")
        m = data["datasets"][cfg]
        desc = f"{m['images']} JPEGs {m['size_wh'][0]}x{m['size_wh'][1]} (~{m['mean_kb']:.0f} KB) -> {m['crop']}"
        lines.append(f"| {desc} | {'EpochSeededDataset (the Trainer)' if path == 'seeded' else 'ImageFolder'} | "
                     f"{w[1:]} | {r['median']:.0f} | {r['min']:.0f}-{r['max']:.0f} |")
    step = result.get("trainer_vs_bare", {}).get("variants", {}).get("trainer", {}).get("images_per_s", {}).get("median")
    load0 = data["images_per_s"].get("cifar_like/seeded/w0", {}).get("median")
    if step and load0:
        lines += ["", f"The training step consumes {step:.0f} images/s here; the Trainer's path gives {load0:.0f} "
                      f"images/s in the main process (workers=0), so loading inline adds ~{100 * step / load0:.0f} % "
                      "to each step. Workers are separate processes; on this 2-core machine they compete with the "
                      "training process and with each other for the same two cores."]
    return lines + md_gpu(result)


def md_gpu(result: dict) -> List[str]:
    est, data = result.get("gpu_estimate"), result["data_loading"]
    if not est or not est.get("measured_img_s_per_core_224"):
        return []
    ref = GPU_REFERENCE
    lo, hi = est["needed_img_s_8_gpus"]
    c_lo, c_hi = est["cores_needed_at_this_rate"]
    pg_lo, pg_hi = est["resnet152_at_pgd3_img_s_per_gpu"]
    return ["", "### What an 8-GPU ImageNet ResNet-152 AT+CAS run needs (an estimate: no GPU was measured)", "",
            f"- ResNet-50 trains at {ref['resnet50_train_img_s_a100_amp']} images/s on one A100 with AMP "
            f"({ref['resnet50_train_img_s_a100_amp_source']}).",
            f"- ResNet-152 trains at {ref['resnet152_over_resnet50_train']:.3f}x ResNet-50's rate "
            f"({ref['resnet152_over_resnet50_source']}): ~{est['resnet152_standard_train_img_s_per_gpu']} images/s "
            "per A100.",
            f"- A PGD-3 AT step costs 3-4x a standard step ({ref['at_pgd3_cost_factor_note']}): ~{pg_lo}-{pg_hi} "
            f"images/s per A100, so **{lo}-{hi} images/s for 8 A100s**. H100s are faster (unmeasured here; at an "
            "assumed ~2x an A100, double every figure below).",
            f"- One core here decodes and augments ~{est['measured_img_s_per_core_224']:.0f} ImageNet-sized JPEGs/s "
            f"to 224 through the Trainer's path (500x375, ~{data['datasets']['imagenet_like']['mean_kb']:.0f} KB "
            "each; real ImageNet images vary in size and content, so this is an approximation): the run needs "
            f"**~{c_lo:.0f}-{c_hi:.0f} cores busy decoding** (~{2 * c_hi:.0f} for 8 H100s at ~2x). The recipe's 8 workers "
            f"x 8 processes = 64 workers would give ~{est['recipe_workers_img_s_at_this_rate']} images/s at this rate "
            f"if the node has 64 free cores, and the storage must deliver ~{hi * 0.11:.0f} MB/s (110 KB per JPEG)."]


def markdown(result: dict, command: str) -> str:
    env, s = result["environment"], result["settings"]
    tvb, ccl = result["trainer_vs_bare"], result["compile_channels_last"]
    lines = ["# Training throughput: Trainer vs bare loop, compile, channels_last, data loading", "",
             f"`{command}`", "",
             f"{env['cpu_model']}, {env['cpu_count']} cores shared with other work, torch {env['torch']} "
             f"({env['torch_threads']} thread), timm {env['timm']}, accelerate {env['accelerate']}. AT+CAS on "
             f"`cifar_resnet18` width {s['width']} with CAS after `layer4.0` and `layer4.1`; PGD-{s['attack_steps']} "
             "(eps 8/255, step 2/255) in eval mode with predicted routing, update routed by the labels; SGD; batch "
             f"{s['batch']}; {s['steps_per_epoch']} steps per epoch of random 32x32 images held in memory. Each part "
             "runs its variants round-robin (order rotated every round) after a warm-up round; a round's figure is "
             "the steady-state rate of one epoch (its first step left out).", "",
             f"## 1. Trainer vs bare loop ({s['rounds']} rounds)", "",
             "`bare_seeded` is the bare loop reading its batches through `EpochSeededDataset`, the Trainer's data "
             "path: it separates that cost from the rest of the Trainer's.", ""]
    lines += md_variants(tvb) + [""] + md_ratios(tvb)
    tob = tvb["ratios"].get("trainer_over_bare")
    if tob:
        wall, cpu = tob["of_medians"], tob["of_median_cpu_rates"]
        verdict = ("meets" if min(wall, cpu) >= GOAL_RATIO else "misses" if max(wall, cpu) < GOAL_RATIO else
                   "is ambiguous about (the two measures disagree: background load)")
        lines += ["", f"Trainer / bare = **{wall:.3f}** in wall-clock images/s and **{cpu:.3f}** in images per "
                      f"CPU-second (medians over rounds): {verdict} the goal of >= {GOAL_RATIO}."]
    dp = tvb.get("data_path", {}).get("ms_per_batch")
    if dp:
        lines += ["", f"Iterating the data alone, ms per batch of {s['batch']}: bare DataLoader "
                      f"{dp['bare_loader']['median']:.2f}, the same over `EpochSeededDataset` "
                      f"{dp['epoch_seeded_loader']['median']:.2f}, the Trainer's prepared loader "
                      f"{dp['trainer_loader']['median']:.2f} (median of {dp['trainer_loader']['n']} passes)."]
    lines += md_profile(tvb)
    lines += ["", f"## 2. Eager vs compiled vs channels_last through the Trainer ({s['compile_rounds']} rounds, "
                  f"backend {s['compile_backend']})", ""]
    lines += md_variants(ccl) + [""] + md_ratios(ccl) + md_compile(ccl)
    graphs = ccl.get("dynamo_stats", {}).get("unique_graphs")
    expected = 2 * len(ccl["compile"])  # per compiled Trainer: the attack's eval-mode graph, the update's train-mode one
    if graphs is not None and expected:
        lines += ["", f"Dynamo compiled {graphs} graphs in all for {len(ccl['compile'])} compiled Trainers "
                      + ("(2 each: the attack's eval-mode graph and the update's train-mode graph; nothing recompiled)."
                         if graphs == expected else f"(expected {expected}: look for recompilation or graph breaks).")]
    if result.get("errors"):
        lines += ["", "Failed variants: " + "; ".join(f"{k}: {v[:300]}" for k, v in result["errors"].items())]
    lines += md_data(result)
    lines += ["", f"Load average (1, 5, 15 min) at start {result['load_average']['start']}, at end "
                  f"{result['load_average']['end']}. Raw numbers: `train_throughput.json`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for train_throughput.json and .md")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: fewer, shorter rounds; compile with "
                                                        "the 'eager' backend unless --compile-backend is given")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    p.add_argument("--width", type=float, default=0.25, help="cifar_resnet18 width")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--attack-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps-per-epoch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8, help="measured rounds of part 1, Trainer vs bare (after a warm-up)")
    p.add_argument("--compile-rounds", type=int, default=4, help="measured rounds of part 2, compile / channels_last")
    p.add_argument("--compile-backend", default=None, help="inductor (default), eager, or none to skip compiling")
    p.add_argument("--images", type=int, default=512, help="JPEGs per generated ImageFolder")
    p.add_argument("--data-rounds", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.compile_rounds, args.steps_per_epoch, args.batch = 2, 2, 4, 32
        args.images, args.data_rounds = 128, 2
        args.compile_backend = args.compile_backend or "eager"
    args.compile_backend = args.compile_backend or "inductor"
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="casify_train_tp_"))
    # a cold inductor cache, so the first step shows the whole compilation; one compile worker (shared machine)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workdir / "inductor_cache")
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1
    log = lambda msg: print(msg, flush=True)
    result = {"benchmark": "train_throughput", "environment": environment(), "load_average": {"start": load_average()},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "goal_trainer_over_bare": GOAL_RATIO}
    result["settings"].update(model="timm cifar_resnet18 + casify.wrap(['layer4.0', 'layer4.1'], init='paper', "
                                    "normalize=None)", method="at", cas=True, eps="8/255", attack_alpha="2/255",
                              optimizer="SGD momentum 0.9, weight decay 5e-4 (not on 1-d parameters), lr constant",
                              data="TensorDataset of random 32x32 images, shuffled, drop_last",
                              inductor="cold cache (fresh TORCHINDUCTOR_CACHE_DIR), compile_threads=1")
    try:
        t0 = time.perf_counter()
        template = build_model(args.width, args.seed)
        dataset = synthetic_dataset(args.batch * args.steps_per_epoch, args.seed)
        loops = training_variants(args, template, dataset, workdir)
        errors: dict = {}
        part1 = ["bare", "bare_seeded", "trainer"]
        log(f"part 1, Trainer vs bare loop: {part1}")
        measured1 = run_part(loops, part1, args.rounds, errors, log)
        part2 = [n for n in loops if n.startswith("trainer")]
        log(f"part 2, compile and channels_last: {part2}")
        part1_s = round(time.perf_counter() - t0, 1)
        measured2 = run_part(loops, part2, args.compile_rounds, errors, log)
        summary1 = summarise_part(loops, measured1, args.batch)
        summary2 = summarise_part(loops, measured2, args.batch)
        result["trainer_vs_bare"] = {
            "variants": summary1,
            "ratios": ratios(measured1, summary1, {"trainer_over_bare": ("trainer", "bare"),
                                                   "bare_seeded_over_bare": ("bare_seeded", "bare"),
                                                   "trainer_over_bare_seeded": ("trainer", "bare_seeded")}),
            "data_path": data_path_ms(loops, dataset, args.batch, args.seed, args.rounds),
            "seconds": part1_s}
        result["compile_channels_last"] = {
            "variants": summary2,
            "ratios": ratios(measured2, summary2, {
                "channels_last_over_eager": ("trainer_channels_last", "trainer"),
                "compiled_over_eager": ("trainer_compiled", "trainer"),
                "compiled_channels_last_over_eager": ("trainer_compiled_channels_last", "trainer"),
                "compiled_channels_last_over_compiled": ("trainer_compiled_channels_last", "trainer_compiled"),
                "compiled_channels_last_over_channels_last": ("trainer_compiled_channels_last",
                                                              "trainer_channels_last")}),
            "compile": compile_costs(summary2, args.batch), "dynamo_stats": dynamo_stats(),
            "seconds": round(time.perf_counter() - t0 - part1_s, 1)}
        result["errors"] = errors
        if not args.no_profile:
            log("profiling one epoch of each loop")
            prof = {"bare": profile_epoch(loops["bare"], "bare"), "trainer": profile_epoch(loops["trainer"], "trainer")}
            prof["attribution"] = overhead_attribution(prof["bare"], prof["trainer"])
            prof["note"] = ("the two epochs ran one after the other, not interleaved, so differences in kernel time "
                            "(attack, backward) are load noise; cProfile slows Python-heavy code more than kernels")
            result["trainer_vs_bare"]["profile"] = prof
        if not args.skip_data:
            t0 = time.perf_counter()
            log("data loading part")
            result["data_loading"] = data_loading(args, workdir / "images", log)
            result["data_loading"]["seconds"] = round(time.perf_counter() - t0, 1)
            result["gpu_estimate"] = gpu_estimate(result["data_loading"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_average"]["end"] = load_average()
    command = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = command.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "train_throughput.md").write_text(markdown(result, result["command"]))
    summary = {k: v and round(v["of_medians"], 3) for part in ("trainer_vs_bare", "compile_channels_last")
               for k, v in result.get(part, {}).get("ratios", {}).items()}
    log(json.dumps({"ratios": summary, "compile": result.get("compile_channels_last", {}).get("compile")}, indent=1))


if __name__ == "__main__":
    main()
