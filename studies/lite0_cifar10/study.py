"""The mission's own case on a real network (issue 27): ImageNet-pretrained EfficientNet-Lite0 made robust on
CIFAR-10 by AT fine-tuning, with and without each channel-wise defense.

From the real ImageNet-1k weights (``efficientnet_lite0_imagenet.safetensors``, timm's keys; a new 10-class
classifier), every arm is fine-tuned with PGD-3 AT at eps 8/255 (L-inf, pixel space) under the same budget
(:data:`PROTOCOL`), selected at its last step, and scored on test846 with the adaptive union
(:func:`studies._scoring.union_attacks`); seed 0 of every arm also gets restart saturation and AutoAttack (standard)
and Square on 200 images, routed arms the routing echo against its real null. Comparisons
follow :data:`casify.evaluate.compare.CROSSED_SEED_RULE` (both arms at one commit, crossed bootstrap, Holm over the
family), written into ``results/study.json`` by ``--init`` and committed before the first run.

    python -m studies.lite0_cifar10.study --init                                  # the rule, before any run
    OMP_NUM_THREADS=1 python -m studies.lite0_cifar10.study --work --data-dir ../shared/data/cifar10 \
        --checkpoint ../shared/models/efficientnet_lite0_imagenet.safetensors      # one worker; run two
    python -m studies.lite0_cifar10.study --report --data-dir ../shared/data/cifar10

Run it from a worktree pinned to one commit, so that every run records the same code (the rule refuses to judge
arms whose commits differ).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from studies import _protocol as protocol
from studies._protocol import Arm, Study
from studies._records import read_json, sha256, write_json
from studies._scoring import EPS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = HERE / "models"
# The timm variant the shared weights belong to (TF padding, batch-norm eps 1e-3, mean = std = 0.5): variant_check.py
ARCH = "tf_efficientnet_lite0"
# The two last blocks of the stride-32 stage (blocks.5.3: 192 channels, blocks.6.0: 320): the paper puts CAS after
# the last stage's blocks of ResNet-18 (layer4.0, layer4.1), two modules at the network's coarsest resolution.
LAST_BLOCKS = ["blocks.5.3", "blocks.6.0"]
WEIGHTS_SHA256 = "384371dbd49f5bd24d4e89f607c22e2b1babbdb5c58d86a1cf3279ac1d490191"  # ../shared/models/README.md
ARMS = {
    "at": Arm("at"),
    "at_cas": Arm("at", "cas", LAST_BLOCKS),
    # label-free routing (each module routed by its own argmax in the update too): no label leak into the mask
    "at_cas_predicted": Arm("at", "cas", LAST_BLOCKS, loss_kwargs={"train_routing": "predicted"}),
    # CIFS as its authors configure it (HanshuYAN/CIFS resnet_CIFS.py): an MLP probe on the first wrapped block, a
    # linear probe on the second, top-2 logits, softmax mask, their init; beta 2 (their joint loss at beta 2)
    "at_cifs": Arm("at", "cifs", LAST_BLOCKS, options={"probe": "linear"},
                   layer_options={LAST_BLOCKS[0]: {"probe": "mlp"}}),
    # FSR after the last stage (the authors' placement: one block after layer4), lam_sep = lam_rec = 1 (beta 3 in
    # casify's joint term), trained against the authors' attack: CE of the final logits (their train.py)
    "at_fsr": Arm("at", "fsr", ["blocks.6"], beta=3.0, loss_kwargs={"training_objective": "ce"}),
}
SEEDS = (0, 1, 2)
EXTRA_SEEDS = {"at": (3, 4), "at_cas": (3, 4)}  # "5 for AT and AT+CAS if the budget allows": last in the schedule
SCHEDULE = ([(arm, s) for s in SEEDS for arm in ARMS]
            + [(arm, s) for s in (3, 4) for arm, seeds in EXTRA_SEEDS.items() if s in seeds])
# Written before the first run, from the input-size measurement (results/input_size.json) and the budget (about
# 8 CPU-hours for the study on two processes of one thread each); see README.md.
# Paused (results/study.json): the natural_* keys and ARCH are the pilots' fixes, not yet an amendment; --work refuses
# to run until study.json records one.
PROTOCOL = {"arch": ARCH, "natural_steps": 78, "natural_lr": 0.003, "natural_trainable": "classifier", "image_size": 64, "train_images": 10000, "val_start": 45000, "val_size": 500, "epochs": 2.0,
            "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
            "warmup_steps": 20, "attack_steps": 3, "eps": "8/255", "attack_alpha": "2.5 * eps / 3",
            "val_attack_steps": 10, "selection": "last step (final/), the same for every arm", "test": "test846.npz"}
COMPARISONS = {  # name: (A, B); A is the arm the hypothesis favours
    "at_cas_vs_at": ("at_cas", "at"),
    "at_cas_predicted_vs_at": ("at_cas_predicted", "at"),
    "at_cifs_vs_at": ("at_cifs", "at"),
    "at_fsr_vs_at": ("at_fsr", "at"),
}


def imagenet_base(checkpoint: str):
    """The ImageNet weights in the protocol's timm variant with a new 10-class classifier (drawn from the current
    torch seed); refused unless they are the study's weights."""
    from casify.model.pretrained_weights import create_timm_from_checkpoint
    base, loaded = create_timm_from_checkpoint(PROTOCOL["arch"], checkpoint, num_classes=10)
    if loaded.sha256 != WEIGHTS_SHA256:
        raise ValueError(f"{checkpoint} is not the study's ImageNet weights (SHA-256 {loaded.sha256[:16]}..., the rule "
                         f"names {WEIGHTS_SHA256[:16]}...)")
    return base


def train_only_classifier(model: torch.nn.Module, base: torch.nn.Module, only: bool) -> None:
    """``only``: a linear probe, the ImageNet features stay as they are (every other weight frozen); else every
    weight trains."""
    head = {id(w) for w in base.get_classifier().parameters()}
    for w in model.parameters():
        w.requires_grad_(not only or id(w) in head)


def natural_folder(runs_dir: Path, seed: int) -> Path:
    return Path(runs_dir) / f"natural_s{seed}"


def natural_base(seed: int, checkpoint: str, data, runs_dir: Path) -> dict:
    """The seed's natural fine-tune of the ImageNet weights (no attack, no defense: ``natural_steps`` at
    ``natural_lr``), trained once and shared by every arm of that seed, so that a seed's arms differ only in their
    robust fine-tuning. One worker trains it (a claim, resumable); another that needs it waits for its record."""
    import casify
    from casify.core.code_version import code_version
    from casify.io.serialization import atomic_write
    from casify.train import TrainConfig, Trainer
    from safetensors.torch import save_file
    out = natural_folder(runs_dir, seed)
    record_path = out / "natural_base.json"
    while not record_path.exists():
        if not protocol.claim(out, ".natural_claim"):
            time.sleep(15)  # another worker trains it
            continue
        if record_path.exists():
            break
        p = PROTOCOL
        torch.manual_seed(seed)
        base = imagenet_base(checkpoint)
        size = p["image_size"]
        model = casify.wrap(base, [], input_size=(3, size, size))  # shares its modules with ``base``
        train_only_classifier(model, base, p["natural_trainable"] == "classifier")
        config = TrainConfig(method="standard", cas=False, epochs=1.0, max_steps=p["natural_steps"],
                             batch_size=p["batch_size"], lr=p["natural_lr"], momentum=p["momentum"],
                             weight_decay=p["weight_decay"], schedule="cosine", seed=seed,
                             val_max_examples=p["val_size"], val_attack_steps=p["val_attack_steps"],
                             checkpoint_every_steps=20, progress=False, output_dir=str(out / "train"))
        state, seconds, validation = protocol.train_timed(Trainer(model, *data, config), out)
        weights = out / "base.safetensors"
        atomic_write(weights, lambda tmp: save_file({k: v.contiguous() for k, v in base.state_dict().items()},
                                                    str(tmp)))
        train_only_classifier(model, base, False)
        write_json(record_path, {
            "seed": seed, "steps": state.global_step, "seconds": round(seconds, 1),
            "validation_seconds": round(validation, 1), "history": state.history, "config": config.to_dict(),
            "base_sha256": sha256(weights), "imagenet_sha256": WEIGHTS_SHA256, "code": code_version()})
    return read_json(record_path)


def build_model(arm: Arm, seed: int, checkpoint: str, runs_dir: Path):
    """The arm's model: the seed's natural base (:func:`natural_base`) wrapped with the arm's defense (its modules
    drawn from the run's seed)."""
    import casify
    from safetensors.torch import load_file
    torch.manual_seed(seed)
    base = imagenet_base(checkpoint)
    base.load_state_dict(load_file(str(natural_folder(runs_dir, seed) / "base.safetensors")), strict=True)
    size = PROTOCOL["image_size"]
    return casify.wrap(base, arm.layers, input_size=(3, size, size), defense=arm.defense or "cas", init=arm.init,
                       layer_options=arm.layer_options, **arm.options)


def prepare(name: str, arm: Arm, seed: int, out: Path, data, checkpoint: str, runs_dir: Path) -> None:
    """Before a run's model is built: its seed's natural base, its record copied into the run (archived with it)."""
    write_json(out / "natural_base.json", natural_base(seed, checkpoint, data, runs_dir))


def datasets(data_dir: Path, size: Optional[int] = None, train_images: Optional[int] = None,
             val_size: Optional[int] = None):
    """The first ``train_images`` of train.npz (pad-crop-flip at ``size``) and ``val_size`` held-out ones from
    45,000 on, both upsampled to ``size`` (bilinear, antialiased); the protocol's values by default."""
    from casify.data import NpzDataset, ResizeTensor, Then, cifar_train_transform
    size = size or PROTOCOL["image_size"]
    train_images = train_images or PROTOCOL["train_images"]
    val_size = val_size or PROTOCOL["val_size"]
    path = data_dir / "train.npz"
    train = NpzDataset(path, transform=Then(ResizeTensor(size), cifar_train_transform(size, padding=size // 8)),
                       indices=list(range(train_images)))
    start = PROTOCOL["val_start"]
    val = NpzDataset(path, transform=ResizeTensor(size), indices=list(range(start, start + val_size)))
    return train, val


def test_set(data_dir: Path):
    from casify.data import NpzDataset, ResizeTensor
    return NpzDataset(data_dir / "test846.npz", transform=ResizeTensor(PROTOCOL["image_size"]))


def train_config(name: str, arm: Arm, seed: int, out: Path):
    from casify.train import TrainConfig
    eps = EPS
    p = PROTOCOL
    return TrainConfig(method=arm.method, cas=arm.defended, beta=arm.beta, loss_kwargs=dict(arm.loss_kwargs),
                       epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], momentum=p["momentum"],
                       weight_decay=p["weight_decay"], schedule=p["schedule"], warmup_steps=p["warmup_steps"],
                       eps=eps, attack_steps=p["attack_steps"], attack_alpha=2.5 * eps / p["attack_steps"], seed=seed,
                       val_max_examples=p["val_size"], val_attack_steps=p["val_attack_steps"],
                       checkpoint_every_steps=20, progress=False, output_dir=str(out))


def check_not_paused(record: Optional[dict]) -> None:
    """A paused study takes no run until its amendment is written into results/study.json ("amendments")."""
    if record and record.get("paused") and not record.get("amendments"):
        raise SystemExit("lite0_cifar10 is paused (results/study.json, 'paused' and 'pilots_after_pause'): write the "
                         "amendment chosen on held-out data into its 'amendments' before any run")


def study(args) -> Study:
    if getattr(args, "work", False):
        check_not_paused(read_json(RESULTS / "study.json"))
    data_dir = Path(args.data_dir)
    routed = {n for n, a in ARMS.items() if a.defense in ("cas", "cifs")}
    return Study(
        name="lite0_cifar10", arms=ARMS, schedule=SCHEDULE,
        build_model=lambda name, arm, seed: build_model(arm, seed, args.checkpoint, Path(args.runs_dir)),
        prepare=lambda name, arm, seed, out, data: prepare(name, arm, seed, out, data, args.checkpoint,
                                                           Path(args.runs_dir)),
        datasets=lambda name: datasets(data_dir), test_set=lambda name: test_set(data_dir), train_config=train_config,
        # the CPU budget: the union on every run; saturation, AutoAttack and Square on seed 0 of every arm
        extras={"saturation.json": lambda arm, seed: seed == 0, "autoattack.json": lambda arm, seed: seed == 0,
                "echo.json": lambda arm, seed: arm in routed})


def decision_rule() -> dict:
    from casify.evaluate.compare import CROSSED_SEED_RULE
    return {"rule": CROSSED_SEED_RULE,
            "metric": "per-example worst case over every row of the adaptive union, test846, eps 8/255 (L-inf, pixel "
                      "space); the model of each run is its last step",
            "family": {k: {"A": a, "B": b} for k, (a, b) in COMPARISONS.items()},
            "also_reported": ["natural accuracy (same rule, not Holm-adjusted: not a hypothesis)",
                              "restart saturation (4 more PGD-100 restarts, seed 1) on seed 0 of every arm",
                              "AutoAttack (standard) and Square (5,000 queries) on the first 200 images, seed 0 of "
                              "every arm", "the routing echo of routed arms against its null (the model's own "
                              "prediction equals the drawn class)"],
            "natural_target": "plain AT >= 75 % natural accuracy is the issue's aim; the protocol's budget is what "
                              "fits about 8 CPU-hours, and the report says what was reached",
            "protocol": PROTOCOL, "arms": {k: a.to_dict() for k, a in ARMS.items()}, "schedule": SCHEDULE,
            "base": {"architecture": ARCH, "weights": "efficientnet_lite0_imagenet.safetensors",
                     "weights_sha256": WEIGHTS_SHA256}}


def main(argv=None):
    protocol.cli(argv, __doc__.splitlines()[0], study, decision_rule, results=RESULTS, models=MODELS,
                 comparisons=COMPARISONS, module="studies.lite0_cifar10.study", runs_dir="outputs/lite0_cifar10",
                 title="ImageNet-pretrained EfficientNet-Lite0 made robust on CIFAR-10, with and without each "
                       "channel-wise defense",
                 extra_args=[("--checkpoint", {"default": "../shared/models/efficientnet_lite0_imagenet.safetensors",
                                               "help": "the ImageNet-1k weights under timm's keys"})])


if __name__ == "__main__":
    main()
