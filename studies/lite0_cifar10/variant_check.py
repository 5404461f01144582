"""Which timm variant the shared Lite0 weights belong to: ``efficientnet_lite0`` or ``tf_efficientnet_lite0``.

Why: the weights (``../shared/models/efficientnet_lite0_imagenet.safetensors``) are a port of a third-party package
whose tensors map onto timm's keys; both timm variants have exactly those keys and shapes, so a key check passes for
either. They differ in what the keys cannot show: ``tf_`` pads like TensorFlow ("same", asymmetric), uses batch-norm
eps 1e-3, and its ``pretrained_cfg`` normalises with mean = std = 0.5; ``efficientnet_lite0`` pads symmetrically,
uses eps 1e-5 and ImageNet's mean / std. Weights trained under one convention lose accuracy under the other.

The measurement, on held-out CIFAR-10 training images (45,000 on; never the test set), with no training: (a) how
confidently the 1000-class ImageNet head classifies them (mean max-softmax: features built under the right
convention give sharper ImageNet predictions), and (b) the 10-nearest-neighbour accuracy of the pooled features (the
first ``--bank`` images are the neighbours, the next ``--queries`` the queries), each variant with its own
``pretrained_cfg`` normalisation and, for the swap, with the other's.

    OMP_NUM_THREADS=1 python -m studies.lite0_cifar10.variant_check --data-dir ../shared/data/cifar10 \
        --checkpoint ../shared/models/efficientnet_lite0_imagenet.safetensors     # -> results/variant_check.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from studies._records import sha256, write_json

HERE = Path(__file__).resolve().parent
VARIANTS = ("efficientnet_lite0", "tf_efficientnet_lite0")
HELD_OUT_START = 45000


def held_out_images(data_dir: Path, n: int):
    with np.load(Path(data_dir) / "train.npz") as data:
        x = torch.from_numpy(data["x"][HELD_OUT_START:HELD_OUT_START + n]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(data["y"][HELD_OUT_START:HELD_OUT_START + n]).long()
    return x, y


def features(arch: str, checkpoint: str, mean, std, x: torch.Tensor, size: int, batch: int = 100):
    """Pooled features and ImageNet max-softmax of ``x`` resized to ``size``, under ``mean`` / ``std``."""
    import timm
    from safetensors.torch import load_file
    model = timm.create_model(arch, num_classes=1000)
    model.load_state_dict(load_file(checkpoint), strict=True)  # the same tensors under both variants' keys
    model.eval()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    feats, confidence = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.nn.functional.interpolate(x[i:i + batch], size=size, mode="bilinear", antialias=True,
                                                 align_corners=False)
            pooled = model.forward_head(model.forward_features((xb - mean_t) / std_t), pre_logits=True)
            feats.append(pooled)
            confidence.append(model.get_classifier()(pooled).softmax(1).max(1).values)
    return torch.cat(feats), torch.cat(confidence)


def knn_accuracy(feats: torch.Tensor, y: torch.Tensor, bank: int, k: int = 10) -> float:
    f = torch.nn.functional.normalize(feats, dim=1)
    neighbours = (f[bank:] @ f[:bank].T).topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(y[:bank][neighbours], 10).sum(1)
    return (votes.argmax(1) == y[bank:]).float().mean().item()


def main(argv=None):
    import timm
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--checkpoint", default="../shared/models/efficientnet_lite0_imagenet.safetensors")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--bank", type=int, default=1000)
    p.add_argument("--queries", type=int, default=500)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, y = held_out_images(Path(args.data_dir), args.bank + args.queries)
    cfg = {arch: timm.create_model(arch, pretrained=False).pretrained_cfg for arch in VARIANTS}
    rows = []
    for size in args.sizes:
        for arch in VARIANTS:
            for norm_of in VARIANTS:
                start = time.time()
                feats, conf = features(arch, args.checkpoint, cfg[norm_of]["mean"], cfg[norm_of]["std"], x, size)
                rows.append({"arch": arch, "normalisation_of": norm_of, "size": size,
                             "knn10_accuracy": round(knn_accuracy(feats, y, args.bank), 4),
                             "imagenet_mean_max_softmax": round(conf[:args.bank].mean().item(), 4),
                             "seconds": round(time.time() - start, 1)})
                print(rows[-1], flush=True)
    from casify.core.code_version import code_version
    record = {"checkpoint_sha256": sha256(Path(args.checkpoint)), "held_out": [HELD_OUT_START, len(x)],
              "bank": args.bank, "queries": args.queries, "k": 10, "rows": rows, "code": code_version(),
              "torch": torch.__version__, "timm": timm.__version__}
    best = max((r for r in rows if r["arch"] == r["normalisation_of"]), key=lambda r: (r["size"], r["knn10_accuracy"]))
    record["verdict"] = (f"at {best['size']} px the better variant (its own normalisation) is {best['arch']}")
    write_json(HERE / "results" / "variant_check.json", record)
    print(record["verdict"])


if __name__ == "__main__":
    main()
