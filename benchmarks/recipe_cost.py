"""What a shipped recipe costs: images/s of its training step on this device, peak memory, and the run's device-hours.

Why this exists: the ImageNet ResNet-152 recipe's cost was an estimate from published figures for other models. This
measures the recipe's own step - its model, per-process batch, training attack, precision, compile and channels-last
settings, through casify's Trainer - on synthetic images of the recipe's size (the step's speed does not depend on the
pixels, so no dataset is needed and nothing is downloaded: the model is built with ``pretrained: false``), and turns
the measured rate into the run's device-hours: the training images of every epoch over the measured images/s, plus
the held-out validations the recipe schedules (PGD on ``val_max_examples`` every ``val_every_steps``).

Variants switch compile / channels-last against the recipe as shipped; each gets a Trainer of its own (compiled once,
the first step holds the compilation) and they run round-robin, so slow drift on a shared machine falls on every
variant alike. A measurement window is closed with a device synchronisation at both ends (the Trainer itself does
not wait for the device between log steps), so on a GPU the rate is the device's, not the host's queueing rate.

    # on a GPU (what issue 12 asks for; benchmarks/gpu_speed.sh recipe runs it within a device call's 10 minutes)
    python benchmarks/recipe_cost.py --recipe recipes/configs/imagenet_resnet152_at_cas.yaml --out benchmarks/results
    # a CPU smoke run of the same path on the digits recipe (seconds)
    python benchmarks/recipe_cost.py --recipe recipes/configs/digits_tiny_at_cas.yaml --train-images 1437 \\
        --variants shipped --steps 3 --rounds 1 --out /tmp/recipe_cost
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from casify.recipe import CommandLine, Recipe, build_model, load_recipe
from casify.train import Trainer, TrainConfig

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set (Russakovsky et al. 2015, Table 2)
VARIANTS = {  # name -> (compile, channels_last); "shipped" keeps the recipe's own settings
    "shipped": None,
    "eager": (False, False),
    "eager_channels_last": (False, True),
    "compiled": (True, False),
    "compiled_channels_last": (True, True),
}


class SyntheticImages(Dataset):
    """``size`` items cycling through a small pool of random images of ``shape`` (what the loader hands the step is
    all that matters for its speed; a pool keeps the data path free)."""

    def __init__(self, size: int, shape: Sequence[int], num_classes: int, pool: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(min(pool, size), *shape, generator=g)
        self.labels = torch.randint(0, num_classes, (len(self.images),), generator=g)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.images[i % len(self.images)], self.labels[i % len(self.images)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def input_shape(recipe: Recipe) -> tuple:
    if recipe.model.input_size:
        return tuple(recipe.model.input_size)
    size = recipe.data.image_size or 224
    return (3, int(size), int(size))


def offline(recipe: Recipe):
    """The recipe's model section without downloaded or local weights: the cost of a step does not depend on them."""
    return dataclasses.replace(recipe.model, pretrained=False, checkpoint=None)


class Window:
    """A Trainer callback that times the steps after optimizer step ``start`` up to step ``stop``, synchronised with
    the device at both ends (the first step of a ``train()`` call, which starts the loader, stays outside)."""

    def __init__(self):
        self.start = self.stop = -1
        self.t0 = self.t1 = None

    def arm(self, start: int, stop: int) -> None:
        self.start, self.stop, self.t0, self.t1 = start, stop, None, None

    def __call__(self, trainer: Trainer) -> None:
        step = trainer.state.global_step
        if step == self.start:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        elif step == self.stop:
            synchronize()
            self.t1 = time.perf_counter()


class Variant:
    """One Trainer on the recipe with compile / channels-last set; ``measure(steps)`` extends its run by ``steps``."""

    def __init__(self, name: str, recipe: Recipe, shape: tuple, num_classes: int, workdir: Path, warmup: int,
                 total_steps: int):
        self.name = name
        changes = {}
        if VARIANTS[name] is not None:
            changes["compile"], changes["channels_last"] = VARIANTS[name]
        # measured: the step only. No checkpoints, no validation inside the window, no progress bar
        changes.update(output_dir=str(workdir / name), progress=False, checkpoint_every_steps=None,
                       val_every_steps=None, epochs=1.0, max_steps=None, log_with=None, num_workers=0)
        self.config = dataclasses.replace(recipe.train, **changes)
        batch = self.config.batch_size
        self.window = Window()
        model = build_model(offline(recipe), recipe.defense)
        val = SyntheticImages(2 * batch, shape, num_classes, seed=1)
        # what the variants built before this one hold stays resident: subtracted from this one's peak
        self.allocated_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        t = time.perf_counter()
        # one epoch long enough for every step (an epoch boundary would start a new loader inside a window)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        train_set = SyntheticImages(batch * self.config.grad_accum * processes * (total_steps + 1), shape, num_classes)
        self.trainer = Trainer(model, train_set, val, self.config, callbacks=[self.window])
        # every train() call here ends its (extended) run and would save the model (~240 MB for ResNet-152, hashed):
        # outside every window, but seconds of a short GPU lease each time; this benchmark measures steps, not saving
        self.trainer._save_model = lambda *args, **kwargs: None
        # validation is timed on its own (validate_seconds_per_example), never inside a training window
        self.val_loader, self.trainer.val_loader = self.trainer.val_loader, None
        self.trainer.total_steps = warmup
        torch.backends.cudnn.benchmark = self.config.cudnn_benchmark
        self.trainer.train(resume=True)  # the warm-up: compilation, allocator, cudnn autotuning
        self.construct_and_warmup_s = time.perf_counter() - t
        self.rates: List[float] = []
        self.peak_bytes: List[int] = []
        self.syncs_per_step: Optional[float] = None

    def measure(self, steps: int) -> float:
        """Run ``steps + 1`` more steps and time the last ``steps``; images/s per device."""
        start = self.trainer.state.global_step + 1
        self.window.arm(start, start + steps)
        self.trainer.total_steps = start + steps
        torch.backends.cudnn.benchmark = self.config.cudnn_benchmark  # process-wide: each variant's own setting
        self.trainer.train(resume=True)
        seconds = self.window.t1 - self.window.t0
        rate = steps * self.trainer.global_batch_size / seconds / self.trainer.accelerator.num_processes
        self.rates.append(rate)
        self.peak_bytes.append(torch.cuda.max_memory_allocated() - self.allocated_before if torch.cuda.is_available()
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return rate

    def count_cuda_syncs(self, steps: int) -> None:
        """Host syncs per training step as CUDA itself reports them (``torch.cuda.set_sync_debug_mode``) over the
        ``steps`` steps after the first of a ``train()`` call, none of them a log step: what
        tests/test_host_syncs.py asserts on CPU, checked on the GPU."""
        if not torch.cuda.is_available() or steps < 1:
            return
        start = self.trainer.state.global_step + 1

        def toggle(trainer: Trainer) -> None:
            if trainer.state.global_step == start:
                torch.cuda.set_sync_debug_mode("warn")
            elif trainer.state.global_step == start + steps:
                torch.cuda.set_sync_debug_mode("default")

        self.trainer.config.log_every_steps = 10 ** 9  # read on every step: no log step inside the window
        self.trainer.callbacks.append(toggle)
        self.trainer.total_steps = start + steps + 1  # the last step (it saves the model) stays outside too
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.trainer.train(resume=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.trainer.callbacks.remove(toggle)
        self.syncs_per_step = sum("synchroniz" in str(w.message).lower() for w in caught) / steps

    def summary(self) -> dict:
        c = self.config
        return {"compile": c.compile, "channels_last": c.channels_last, "cudnn_benchmark": c.cudnn_benchmark,
                "mixed_precision": c.mixed_precision,
                "batch_per_device": c.batch_size, "attack_steps": c.attack_steps, "images_per_s": summarise(self.rates),
                "images_per_s_by_round": self.rates, "peak_gib": self.peak_bytes[0] / 2 ** 30,
                "peak_memory_kind": "torch.cuda.max_memory_allocated in the first window, less what the variants "
                                    "built before it hold" if torch.cuda.is_available() else "process max RSS",
                "construct_and_warmup_s": self.construct_and_warmup_s, "cuda_syncs_per_step": self.syncs_per_step}

    def validate_seconds_per_example(self) -> float:
        self.trainer.val_loader = self.val_loader
        torch.backends.cudnn.benchmark = self.config.cudnn_benchmark
        self.trainer.validate()  # warm-up (a compiled scoring graph)
        synchronize()
        t = time.perf_counter()
        metrics = self.trainer.validate()
        synchronize()
        self.trainer.val_loader = None
        return (time.perf_counter() - t) / metrics["val_count"]


def validation_count(total_steps: int, steps_per_epoch: int, val_every_steps: Optional[int], held_out: int) -> int:
    """How often the Trainer validates: every ``val_every_steps`` (else at every epoch's end) and after the last
    step, once when both fall together; never without a held-out split."""
    if held_out <= 0 or total_steps <= 0:
        return 0
    every = val_every_steps or steps_per_epoch
    return total_steps // every + (1 if total_steps % every else 0)


def run_estimate(config: TrainConfig, images_per_s: float, val_s_per_example: Optional[float], train_images: int,
                 held_out: int, num_devices: int) -> dict:
    """Device-hours of the run as configured, from the measured per-device rate (linear scaling assumed): the
    Trainer's own step count (``drop_last`` batches of ``batch_size`` per device), and every validation it runs."""
    train_size = train_images - held_out
    global_batch = config.batch_size * num_devices * config.grad_accum
    steps_per_epoch = train_size // global_batch
    total_steps = int(math.ceil(config.epochs * steps_per_epoch))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    train_hours = total_steps * global_batch / images_per_s / 3600  # device-hours
    validations = validation_count(total_steps, steps_per_epoch, config.val_every_steps, held_out)
    # the Trainer validates on at most val_max_examples of the held-out split, shared by the devices
    val_examples = min(config.val_max_examples, held_out) if config.val_max_examples else held_out
    val_hours = validations * val_examples * val_s_per_example / 3600 if val_s_per_example is not None else 0.0
    return {"num_devices": num_devices, "train_images": train_images, "held_out": train_images - train_size,
            "global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "train_device_hours": train_hours, "validations": validations, "validation_examples": val_examples,
            "validation_device_hours": val_hours, "device_hours": train_hours + val_hours,
            "wall_hours_at_linear_scaling": (train_hours + val_hours) / num_devices}


def summarise(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown(result: dict) -> str:
    lines = [f"# Recipe cost: `{result['recipe']}` on {result['device']}", "",
             f"Command: `{result['command']}`", "",
             "Measured: the recipe's own training step (model, batch per device, training attack, precision) through "
             "casify's Trainer on synthetic images of the recipe's size, each variant round-robin, windows synchronised "
             "with the device at both ends. The estimate multiplies out the recipe's schedule (epochs, held-out "
             "validation) from the measured per-device rate and assumes linear scaling over devices (not measured).",
             "", "| variant | images/s per device (median, min-max) | peak memory (GiB) | warm-up incl. compile (s) |",
             "|---|---|---|---|"]
    for name, v in result["variants"].items():
        r = v["images_per_s"]
        lines.append(f"| {name} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | {v['peak_gib']:.2f} "
                     f"({v['peak_memory_kind']}) | {v['construct_and_warmup_s']:.0f} |")
    if result.get("speedups"):
        lines += ["", "Speed-ups (median rates): " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items())]
    e = result["estimate"]
    if not result["complete"]:
        lines += ["", "**Incomplete**: the run stopped before every window (and the validation timing) was measured."]
    if e is None:
        return "\n".join(lines + [""])
    val = (f"{e['validations']} validations: {e['validation_device_hours']:.3g} device-hours (measured at "
           f"{result['validate_seconds_per_example'] * 1e3:.1f} ms per example)"
           if result["validate_seconds_per_example"] is not None else "validations not timed")
    lines += ["", f"## The run as configured, at the rate of `{result['estimate_variant']}`, on {e['num_devices']} "
              "devices", "",
              f"- {e['total_steps']} steps of {e['global_batch']} images ({e['steps_per_epoch']} per epoch, "
              f"{e['train_images'] - e['held_out']} training images, {e['held_out']} held out)",
              f"- training: **{e['train_device_hours']:.3g} device-hours**; {val}",
              f"- in all {e['device_hours']:.3g} device-hours, {e['wall_hours_at_linear_scaling']:.3g} h of wall time "
              f"on {e['num_devices']} devices if they scale linearly (they do not quite: DDP's gradient all-reduce "
              "and the data loader are not in this measurement)", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="a recipe YAML (recipes/configs/...)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides, as for the recipes (train.batch_size=128)")
    parser.add_argument("--variants", nargs="+", default=["eager", "shipped"], choices=sorted(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring (they hold the compilation)")
    parser.add_argument("--steps", type=int, default=10, help="steps per measured window")
    parser.add_argument("--rounds", type=int, default=2, help="measured windows per variant, round-robin")
    parser.add_argument("--train-images", type=int, default=IMAGENET_TRAIN_IMAGES,
                        help="training-set size the estimate assumes (default: ImageNet-1k's)")
    parser.add_argument("--devices", type=int, default=8, help="devices the estimate spreads the run over")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        parser.error("--steps, --rounds and --warmup must be at least 1")

    # a timeout's SIGTERM runs the clean-up below (the variants' run folders hold saved models)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # every variant compiles its own graphs of the same code objects (update, attack, validation scoring, each
    # per memory format): dynamo's default limit of 8 per code object would fall back to eager without saying so
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    recipe = load_recipe(args.recipe, CommandLine(overrides=args.set))
    shape = input_shape(recipe)
    probe = build_model(offline(recipe), recipe.defense).eval()
    with torch.no_grad():
        num_classes = probe(torch.rand(1, *shape)).shape[1]
    del probe
    workdir = Path(tempfile.mkdtemp(prefix="recipe_cost_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"recipe_cost_{Path(args.recipe).stem}_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    command = "python benchmarks/recipe_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shipped = recipe.train
    held_out = int(recipe.data.val_size or 0)
    variants: dict = {}
    state = {"val_s": None}

    def write(complete: bool) -> dict:
        """The results so far, written after every window: a run cut short (a lease's time limit) keeps them."""
        measured = {n: v for n, v in variants.items() if v.rates}
        chosen = "shipped" if "shipped" in measured else (list(measured)[-1] if measured else None)
        result = {
            "benchmark": "recipe_cost", "complete": complete, "recipe": args.recipe, "overrides": args.set,
            "device": device_name(), "command": command,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda if torch.cuda.is_available() else None},
            "settings": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                         "input_shape": list(shape), "num_classes": num_classes},
            "variants": {name: v.summary() for name, v in measured.items()},
            "speedups": {f"{name} / eager": statistics.median(v.rates) / statistics.median(measured["eager"].rates)
                         for name, v in measured.items() if name != "eager" and "eager" in measured},
            "estimate_variant": chosen, "validate_seconds_per_example": state["val_s"],
            "dynamo_counters": {group: dict(counts) for group, counts in torch._dynamo.utils.counters.items()
                                if group in ("stats", "recompiles", "graph_break")},
            "estimate": run_estimate(shipped, statistics.median(measured[chosen].rates), state["val_s"],
                                     args.train_images, held_out, args.devices) if chosen else None,
        }
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))
        return result

    try:
        total = args.warmup + args.rounds * (args.steps + 1)
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for name in order if r else args.variants:  # round 0 measures each variant as soon as it is built
                if name not in variants:
                    print(f"building {name} (warm-up {args.warmup} steps)", flush=True)
                    variants[name] = Variant(name, recipe, shape, num_classes, workdir, args.warmup, total)
                rate = variants[name].measure(args.steps)
                print(f"round {r} {name}: {rate:.1f} images/s per device", flush=True)
                write(complete=False)
        chosen = "shipped" if "shipped" in variants else args.variants[-1]
        variants[chosen].count_cuda_syncs(args.steps)
        state["val_s"] = variants[chosen].validate_seconds_per_example()
        result = write(complete=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the variants' run folders
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
