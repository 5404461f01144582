"""Why a Lite0 pilot's output went uniform: the features after its last 1x1 convolution, measured (issue 27).

For each phase of a pilot run (``pilot.py --runs-dir``), the phase's final model on the first 64 held-out training
images (45,000 on; the test set is never read): the fraction of ``conv_head``'s outputs above zero and their mean
magnitude, the fraction of the pooled features the classifier reads that are non-zero (after batch norm and ReLU6),
and the spread of the logits over classes (0: a constant output). Written to ``results/dead_units_<candidate>.json``.

    OMP_NUM_THREADS=1 python -m studies.lite0_cifar10.dead_units --candidate zero_frozen_natural_all_trades_eps8 \
        --runs-dir /tmp/lite0_pilot --data-dir ../shared/data/cifar10
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from studies._records import write_json

HERE = Path(__file__).resolve().parent


def measure(folder: Path, checkpoint: str, data_dir: Path, n: int = 64) -> dict:
    import casify
    from casify.model.pretrained_weights import create_timm_from_checkpoint
    from safetensors.torch import load_file
    from studies.lite0_cifar10.study import ARCH, PROTOCOL, datasets
    size = PROTOCOL["image_size"]  # the pilots' size too (pilot.py's COMMON)
    base, _ = create_timm_from_checkpoint(ARCH, checkpoint, num_classes=10, head_init="zero")
    model = casify.wrap(base, [], input_size=(3, size, size))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    model.eval()
    _, val = datasets(data_dir, size, 64, n)
    x = torch.stack([val[i][0] for i in range(n)])
    seen = {}
    # the wrapped model is an fx graph that calls conv_head as a leaf module: hook the module it calls
    conv_head = dict(model.named_modules())[next(k for k, _ in model.named_modules() if k.endswith("conv_head"))]
    classifier = dict(model.named_modules())[next(k for k, _ in model.named_modules() if k.endswith("classifier"))]
    handles = [conv_head.register_forward_hook(lambda m, i, o: seen.__setitem__("conv_head", o.detach())),
               classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("pooled", i[0].detach()))]
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    logits = out if torch.is_tensor(out) else out[0]
    h = seen["conv_head"]
    return {"conv_head_fraction_above_zero": round((h > 0).float().mean().item(), 4),
            "conv_head_mean_abs": round(h.abs().mean().item(), 3),
            "pooled_fraction_nonzero": round((seen["pooled"] != 0).float().mean().item(), 4),
            "logit_std_over_classes": round(logits.std(1).mean().item(), 4),
            "held_out_images": n}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidate", required=True)
    p.add_argument("--runs-dir", default="outputs/lite0_pilot")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--checkpoint", default="../shared/models/efficientnet_lite0_imagenet.safetensors")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = {"candidate": args.candidate}
    for phase in ("natural", "at"):
        folder = Path(args.runs_dir) / args.candidate / phase / "final"
        if folder.exists():
            record[phase] = measure(folder, args.checkpoint, Path(args.data_dir))
            print(phase, record[phase], flush=True)
    from casify.core.code_version import code_version
    record["code"] = code_version()
    write_json(HERE / "results" / f"dead_units_{args.candidate}.json", record)


if __name__ == "__main__":
    main()
