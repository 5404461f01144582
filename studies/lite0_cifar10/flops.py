"""Floating-point operations per training step of the Lite0 protocol, and what they project to on one GPU (issue 27,
part 5).

Measured with ``torch.utils.flop_counter.FlopCounterMode`` on the protocol's model (the timm variant, 64 px, batch
64, plain and with each defense's modules): one forward pass is counted; a backward pass is taken as twice a forward
(the usual rule; the counter's own backward count of depthwise convolutions is inflated, so it is not used). A PGD-k
AT step is k attack passes (forward + backward to the input) plus one update pass: (k + 1) x 3 forwards. The natural
phase trains only the classifier (a forward, and a backward through one linear layer, neglected).

The GPU projection divides the study's FLOPs by a sustained rate. The rate is an assumption, not a measurement: a
network of depthwise convolutions at 64 px keeps a GPU far from its peak, so the projection is given at 10 % and
30 % of an H100's dense FP32 peak (67 TFLOP/s; NVIDIA's H100 SXM datasheet), bracketing it. A lent GPU replaces it
with seconds (``studies/reproduce_gpu``).

    python -m studies.lite0_cifar10.flops --checkpoint ../shared/models/efficientnet_lite0_imagenet.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from studies._records import write_json

HERE = Path(__file__).resolve().parent
H100_FP32_PEAK = 67e12
UTILISATION = (0.10, 0.30)


def forward_flops(model: torch.nn.Module, batch: int, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(batch, 3, size, size))
    return counter.get_total_flops()


def main(argv=None):
    from studies.lite0_cifar10 import study
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="../shared/models/efficientnet_lite0_imagenet.safetensors")
    args = p.parse_args(argv)
    import casify
    P = study.PROTOCOL
    size, batch, k = P["image_size"], P["batch_size"], P["attack_steps"]
    rows = {}
    for name, arm in study.ARMS.items():
        torch.manual_seed(0)
        base = study.imagenet_base(args.checkpoint)
        model = casify.wrap(base, arm.layers, input_size=(3, size, size), defense=arm.defense or "cas",
                            init=arm.init, layer_options=arm.layer_options, **arm.options)
        fwd = forward_flops(model, batch, size)
        rows[name] = {"forward_flops": fwd, "at_step_flops": (k + 1) * 3 * fwd}
    train_images = P["train_images"]
    at_steps = int(P["epochs"] * -(-train_images // batch))
    natural = P["natural_steps"] * rows["at"]["forward_flops"]
    per_run = {name: at_steps * r["at_step_flops"] for name, r in rows.items()}
    total = sum(per_run.values()) * len(study.SEEDS) + natural * len(study.SEEDS)
    record = {"image_size": size, "batch_size": batch, "attack_steps": k, "at_steps_per_run": at_steps,
              "natural_steps_per_seed": P["natural_steps"], "arms": rows, "training_flops_per_run": per_run,
              "training_flops_study": total, "seeds": len(study.SEEDS),
              "gpu_projection_seconds": {f"{int(100 * u)}% of H100 FP32 peak": round(total / (u * H100_FP32_PEAK), 1)
                                         for u in UTILISATION},
              "assumption": "sustained rate = utilisation x 67 TFLOP/s (H100 SXM dense FP32); training only, the "
                            "evaluation not included"}
    write_json(HERE / "results" / "flops.json", record)
    print(record)


if __name__ == "__main__":
    main()
