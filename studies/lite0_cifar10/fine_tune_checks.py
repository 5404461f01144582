"""Two measurements behind the library's fine-tuning defaults, on the shared Lite0 weights and held-out CIFAR-10 at
64 px (issue 27; no training, the test set never read).

1. **Batch-norm modes.** Pooled features of the same batches in training mode (batch statistics) and in eval mode
   (the ImageNet running statistics): their mean cosine and norms. The adversarial training step crafts its
   examples in eval mode and updates in training mode; a low cosine means the two are different functions, which is
   why ``TrainConfig.freeze_bn_stats`` exists.
2. **The new classifier's first loss.** Cross-entropy of the first batches with the 10-class classifier as timm
   initialises it (EfficientNet's init scales with the new class count) and as ``head_init="zero"`` leaves it
   (ln 10 = 2.303).

    OMP_NUM_THREADS=1 python -m studies.lite0_cifar10.fine_tune_checks --data-dir ../shared/data/cifar10 \
        --checkpoint ../shared/models/efficientnet_lite0_imagenet.safetensors     # -> results/fine_tune_checks.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from studies._records import write_json

HERE = Path(__file__).resolve().parent


def main(argv=None):
    import casify
    from casify.model.pretrained_weights import create_timm_from_checkpoint
    from studies.lite0_cifar10.variant_check import held_out_images
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--checkpoint", default="../shared/models/efficientnet_lite0_imagenet.safetensors")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x, y = held_out_images(Path(args.data_dir), 64 * args.batches)
    x = torch.nn.functional.interpolate(x, size=64, mode="bilinear", antialias=True, align_corners=False)
    record = {"arch": args.arch, "size": 64, "batch_size": 64, "batches": args.batches}
    for head_init in ("timm", "zero"):
        torch.manual_seed(0)
        base, _ = create_timm_from_checkpoint(args.arch, args.checkpoint, num_classes=10, head_init=head_init)
        model = casify.wrap(base, [], input_size=(3, 64, 64))
        cosines, norms, losses = [], {"train": [], "eval": []}, []
        for i in range(args.batches):
            xb, yb = x[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)]
            pooled = {}
            for mode in ("eval", "train"):
                model.train(mode == "train")
                with torch.no_grad():
                    pooled[mode] = base.forward_head(base.forward_features(model.input_normalize(xb)),
                                                     pre_logits=True)
                norms[mode].append(pooled[mode].norm(dim=1).mean().item())
            model.eval()
            cosines.append(torch.nn.functional.cosine_similarity(pooled["train"], pooled["eval"]).mean().item())
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model(xb), yb).item())
        record[f"first_loss_head_{head_init}"] = round(sum(losses) / len(losses), 3)
        if head_init == "timm":  # the features do not depend on the head
            record["train_vs_eval_feature_cosine"] = round(sum(cosines) / len(cosines), 3)
            record["feature_norm"] = {m: round(sum(v) / len(v), 1) for m, v in norms.items()}
    from casify.core.code_version import code_version
    record["code"] = code_version()
    write_json(HERE / "results" / "fine_tune_checks.json", record)
    print(record)


if __name__ == "__main__":
    main()
