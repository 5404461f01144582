"""The input size of the EfficientNet-Lite0 recipe, chosen from a measurement (issue 27, part 2).

For each size (32, 64, 96 px: CIFAR-10 upsampled): the ImageNet-pretrained Lite0 with a new 10-class classifier,
fine-tuned naturally (no attack) for one epoch on the first 10,000 training images (batch 64, SGD, cosine), then
its natural accuracy on 1,000 held-out training images (45,000-45,999; never the test set), the seconds per
standard step and the seconds per PGD-3 AT step (what the study's runs pay), one torch thread.

    OMP_NUM_THREADS=1 python -m studies.lite0_cifar10.input_size --size 32 --data-dir ../shared/data/cifar10 \
        --checkpoint ../shared/models/efficientnet_lite0_imagenet.safetensors
    python -m studies.lite0_cifar10.input_size --report     # results/input_size.json -> the table

Each size writes results/input_size_<arch>_<size>.json; --report joins them into results/input_size.json.
``--arch`` is the timm variant the weights are loaded into: ``tf_efficientnet_lite0`` (the default), the variant the
shared weights belong to (``variant_check.py``); the first measurement, under ``efficientnet_lite0``, is kept beside
it for the record.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from studies.lite0_cifar10.variant_check import VARIANTS

HERE = Path(__file__).resolve().parent
ARCH = "tf_efficientnet_lite0"
RESULTS = HERE / "results"
SETTINGS = {"train_images": 10000, "val_start": 45000, "val_size": 1000, "epochs": 1, "batch_size": 64, "lr": 0.02,
            "weight_decay": 5e-4, "schedule": "cosine", "at_steps_timed": 6, "attack_steps": 3, "eps": "8/255"}


def build(size: int, checkpoint: str, arch: str):
    import casify
    from casify.model.pretrained_weights import create_timm_from_checkpoint
    base, loaded = create_timm_from_checkpoint(arch, checkpoint, num_classes=10)
    print(f"[{size}px] {loaded.describe()}", flush=True)
    return casify.wrap(base, [], input_size=(3, size, size))  # normalize="auto": the variant's pretrained_cfg


def datasets(data_dir: Path, size: int):
    from studies.lite0_cifar10.study import datasets as study_datasets
    return study_datasets(data_dir, size, SETTINGS["train_images"], SETTINGS["val_size"])


def measure(size: int, args) -> dict:
    from casify.train import TrainConfig, Trainer
    torch.manual_seed(0)
    model = build(size, args.checkpoint, args.arch)
    train, val = datasets(Path(args.data_dir), size)
    out = Path(args.runs_dir) / f"input_size_{size}"
    config = TrainConfig(method="standard", cas=False, epochs=SETTINGS["epochs"], batch_size=SETTINGS["batch_size"],
                         lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"], schedule=SETTINGS["schedule"],
                         seed=0, val_max_examples=SETTINGS["val_size"], val_attack_steps=1,
                         checkpoint_every_steps=0, progress=False, output_dir=str(out))
    trainer = Trainer(model, train, val, config)
    step_times = [time.time()]
    trainer.callbacks.append(lambda tr: step_times.append(time.time()))
    state = trainer.train(overwrite=True)
    standard_seconds = step_times[-1] - step_times[0]  # the optimizer steps only, not the held-out pass
    acc = state.history[-1]["val_natural"]

    # PGD-3 AT steps at this size (the study's training step), timed after one warm-up step
    at_cfg = TrainConfig(method="at", cas=False, epochs=1, max_steps=SETTINGS["at_steps_timed"] + 1,
                         batch_size=SETTINGS["batch_size"], lr=0.01, attack_steps=SETTINGS["attack_steps"],
                         attack_alpha=2.5 * (8 / 255) / 3, eps=8 / 255, seed=0, val_max_examples=64,
                         checkpoint_every_steps=0, progress=False, output_dir=str(out) + "_at")
    at_trainer = Trainer(build(size, args.checkpoint, args.arch), train, val, at_cfg)
    times = []
    at_trainer.callbacks.append(lambda tr: times.append(time.time()))
    at_trainer.train(overwrite=True)
    at_step = (times[-1] - times[0]) / (len(times) - 1)
    record = {"arch": args.arch, "size": size, "held_out_natural": acc, "validation": state.history,
              "standard_steps": state.global_step, "standard_seconds": round(standard_seconds, 1),
              "seconds_per_standard_step": round(standard_seconds / max(state.global_step, 1), 3),
              "seconds_per_pgd3_step": round(at_step, 3), "threads": torch.get_num_threads(),
              "settings": SETTINGS}
    from casify.core.code_version import code_version
    record["code"] = code_version()
    return record


def report() -> dict:
    rows = sorted((json.loads(p.read_text()) for p in RESULTS.glob("input_size_*_*.json")),
                  key=lambda r: (r["arch"] != ARCH, r["size"]))
    out = {"settings": SETTINGS, "rows": rows}
    (RESULTS / "input_size.json").write_text(json.dumps(out, indent=1))
    print("| timm variant | input | held-out natural | s / standard step | s / PGD-3 step (batch 64, one thread) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['size']} px | {100 * r['held_out_natural']:.1f} % | "
              f"{r['seconds_per_standard_step']:.2f} | {r['seconds_per_pgd3_step']:.2f} |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, choices=(32, 64, 96, 128))
    p.add_argument("--arch", default=ARCH, choices=VARIANTS, help="the timm variant the weights are loaded into")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--checkpoint", default="../shared/models/efficientnet_lite0_imagenet.safetensors")
    p.add_argument("--runs-dir", default="outputs/lite0_cifar10")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.report:
        report()
        return
    if args.size is None:
        p.error("--size or --report")
    record = measure(args.size, args)
    (RESULTS / f"input_size_{args.arch}_{args.size}.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: v for k, v in record.items() if k != "validation"}, default=str), flush=True)


if __name__ == "__main__":
    main()
