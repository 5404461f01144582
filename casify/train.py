"""Adversarial fine-tuning on Accelerate: the same loop on one CPU and on many GPUs.

Each step crafts the adversarial batch with the model in eval mode and every CAS module routed by its own prediction
(the attack does that), then updates in training mode with the CAS modules routed by the true labels (the loss does
that). Checkpoints are written atomically and hold everything an exact resume needs: model, optimizer, learning-rate
scheduler, the RNG states and the position in the epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import attacks, losses
from .defenses import routed_modules
from .data import EpochSeededDataset
from .eps import parse_eps
from .model import CASModel
from .routing import route
from .serialization import atomic_write
from .surgery import wrap
from .trackers import check_log_with, flat_config

SCHEDULES = ("multistep", "cosine", "constant")
METHODS = ("standard", "at", "trades", "mart")
_OPTIONAL = ("compile_mode", "ema_decay", "attack_alpha", "max_steps", "val_every_steps", "val_max_examples", "checkpoint_every_steps", "log_with")
# TrainConfig fields that say where and how a run is logged, not what it computes: a rerun may change them.
NOT_IDENTITY = ("output_dir", "progress", "log_with", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "num_workers", "cudnn_benchmark")
RUN_RECORD = "run_config.json"
EMA_WEIGHTS = "ema.safetensors"


class RunMismatchError(RuntimeError):
    """An output folder holds another run than the one asked for; resuming it would reuse or mix another run."""


@dataclass
class TrainConfig:
    """Everything that decides a run; written to ``<output_dir>/run_config.json``.

    eps and step sizes are in pixel units (inputs in [0, 1]). ``milestones`` are epochs (the paper: 75 and 90 of
    100-200). ``val_*`` settings drive checkpoint selection on the held-out split, never on a test set.
    """
    method: str = "at"  # "standard" (natural training), "at", "trades" or "mart"
    cas: bool = True
    beta: float = 2.0
    defaults: str = "paper"
    loss_kwargs: Dict = field(default_factory=dict)
    eps: float = 8 / 255
    attack_steps: int = 10
    attack_alpha: Optional[float] = 2 / 255
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: Sequence[float] = (75, 90)
    gamma: float = 0.1
    warmup_steps: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 0
    val_every_steps: Optional[int] = None
    val_attack_steps: int = 10
    val_max_examples: Optional[int] = 1000
    compile: bool = False  # torch.compile the model once for the update and once for the attacks
    compile_mode: Optional[str] = None  # torch.compile's mode: None (default), "reduce-overhead", "max-autotune"
    compile_backend: str = "inductor"
    channels_last: bool = False  # NHWC memory format for weights and batches (faster convolutions on GPUs and CPUs)
    # GPUs: let cuDNN time its convolution algorithms for each new shape and keep the fastest (timm's train.py does);
    # sets torch.backends.cudnn.benchmark for the process. It chooses among algorithms for the same convolution, so it
    # is not part of the run's identity (GPU runs are not bit-reproducible across processes in either case).
    cudnn_benchmark: bool = False
    ema_decay: Optional[float] = None  # e.g. 0.999: keep an EMA of the weights (timm's ModelEmaV3); validate and save it
    # None: a checkpoint at the end of every epoch and at the last step, so a killed run resumes; N: every N steps
    # and at the last step; 0: none (a rerun of a finished run then trains it again from step 0)
    checkpoint_every_steps: Optional[int] = None
    keep_checkpoints: int = 2
    output_dir: str = "outputs/run"
    log_with: Optional[str] = None
    log_every_steps: int = 10  # metrics (means over these steps) are read back - a device sync, a collective - once
    # per this many steps, at the end of an epoch and before each validation
    progress: bool = True

    def __post_init__(self):
        self._check_types()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.eps <= 0 or self.eps > 1:
            raise ValueError(f"eps is in pixel units (inputs in [0, 1]); got {self.eps}. Did you mean {self.eps}/255?")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in (0, 1), e.g. 0.999, or null for no EMA; got {self.ema_decay!r}")
        if self.compile_mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode must be null, 'default', 'reduce-overhead' or 'max-autotune', got "
                             f"{self.compile_mode!r}")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps must be at least 1 (1 logs every step), got {self.log_every_steps}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0 (0: no checkpoints, null: once per epoch), got "
                             f"{self.checkpoint_every_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 trains nothing), got {self.max_steps}")
        check_log_with(self.log_with)  # before anything is built, not at the first logged step

    def _check_types(self) -> None:
        """Settings come from YAML and ``--set``: radii may be written ``8/255``, numbers may arrive as strings
        (YAML reads ``1e-3`` as one); anything else of the wrong type is an error that names the setting."""
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        for name in ("eps", "attack_alpha"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)) or isinstance(value, bool):
                setattr(self, name, parse_eps(value))
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            value = getattr(self, f.name)
            if default is None or value is None and f.name in _OPTIONAL or isinstance(default, str) and isinstance(value, str):
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                if isinstance(value, str):
                    try:
                        value = float(value)
                        setattr(self, f.name, value)
                    except ValueError:
                        pass
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif isinstance(default, tuple):
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ValueError(f"train.{f.name} must be a {type(default).__name__} (default {default!r}), "
                                 f"got {value!r} ({type(value).__name__})")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)):
            raise ValueError(f"train.max_steps must be an integer or null, got {self.max_steps!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def identity(self) -> dict:
        """The settings that change what a run computes (everything but where and how it is logged)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}


@dataclass
class TrainState:
    """Where a run is: restored on resume."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    history: List[dict] = field(default_factory=list)


@dataclass
class TrainingRecord:
    """How a saved model was trained: the ``training`` entry of its ``config.json`` (read by the model card)."""
    config: dict
    loss: dict
    attack: Optional[dict]
    selected_on: str
    step: int
    weights: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _first_step_of_epoch(epoch: float, steps_per_epoch: int) -> int:
    """The first optimizer step ``s`` with ``s / steps_per_epoch >= epoch``: milestones may be fractional epochs."""
    step = max(0, math.ceil(epoch * steps_per_epoch))
    while step > 0 and (step - 1) / steps_per_epoch >= epoch:  # float rounding of the product, either way
        step -= 1
    while step / steps_per_epoch < epoch:
        step += 1
    return step


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                 total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers for ``config``, stepped once per optimizer step: linear warmup from ``lr / warmup_steps``
    to ``lr``, then multistep (milestones in epochs), cosine to 0 at ``total_steps``, or constant.

    Cosine is a LambdaLR of the closed form: CosineAnnealingLR updates the rate recursively and drifts from it.
    """
    from torch.optim import lr_scheduler as sched
    warmup, steps_per_epoch = config.warmup_steps, max(1, steps_per_epoch)
    if config.schedule == "multistep":  # counted from the end of warmup, as SequentialLR restarts the count there
        main = sched.MultiStepLR(optimizer, [_first_step_of_epoch(m, steps_per_epoch) - warmup
                                             for m in config.milestones], gamma=config.gamma)
    elif config.schedule == "cosine":
        length = max(1, total_steps - warmup)
        main = sched.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / length))))
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _checkpoint_step(path: Path) -> int:
    """The step of a ``step-<N>`` checkpoint folder: rotation orders by it, not by name."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _differences(old, new, prefix: str = "") -> List[str]:
    """Dotted keys where two JSON-like records differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: not in the folder's run, {new[key]!r} now")
            elif key not in new:
                out.append(f"{where}: {old[key]!r} in the folder's run, not set now")
            else:
                out.extend(_differences(old[key], new[key], where))
        return out
    return [] if old == new else [f"{prefix}: {old!r} in the folder's run, {new!r} now"]


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a model's architecture: a hash of its state-dict names, shapes and dtypes, and its CAS setup."""
    import hashlib
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    record = {"class": type(model).__name__, "parameters_sha256": h.hexdigest()[:16]}
    cas = getattr(model, "casify_config", None)
    if isinstance(cas, dict) and "cas" in cas:
        record["cas"] = json.loads(json.dumps(cas["cas"], default=str))
    return record


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class _MetricWindow:
    """Means of the step metrics since the last log. The sums stay on the device: reading them back (a host sync,
    and a collective across processes) happens at a log step only, so the host never waits for the device in
    between (casify.host_sync; tests/test_host_syncs.py)."""

    def __init__(self):
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.count = 0
        self.other: dict = {}

    def add(self, values: dict) -> None:
        tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
        self.other.update({k: v for k, v in values.items() if not torch.is_tensor(v)})
        names = sorted(tensors)
        device = tensors["loss"].device if "loss" in tensors else tensors[names[0]].device
        stacked = torch.stack([tensors[k].detach().float().reshape(()).to(device) for k in names])
        if self.sums is None or names != self.names:
            self.names, self.sums, self.count = names, torch.zeros_like(stacked), 0
        self.sums += stacked
        self.count += 1

    def flush(self, accelerator) -> dict:
        """The means over the steps since the last flush and over processes; empties the window."""
        if self.sums is None:
            return dict(self.other)
        means = accelerator.gather(self.sums[None] / self.count).mean(dim=0).tolist()
        out = {**self.other, **dict(zip(self.names, means))}
        self.sums, self.count, self.other = None, 0, {}
        return out


class Trainer:
    """Adversarial fine-tuning of a (usually CAS-wrapped) model.

    Args:
        model: the model to train; inputs are pixels in [0, 1].
        train_set / val_set: datasets of (image, label). ``val_set`` is the held-out split for checkpoint selection.
        config: a :class:`TrainConfig`.
        accelerator: an ``accelerate.Accelerator``; by default one is made from the config.
        callbacks: functions ``fn(trainer)`` called after every optimizer step (logging, or stopping a run in tests).
        identity: what else identifies the run beyond ``config`` and the model's architecture (the recipes pass the
            model and data settings); recorded in ``run_config.json`` and compared on resume.

    Augmentation randomness is drawn per item from (seed, epoch, index) (:class:`casify.data.EpochSeededDataset`), so
    a run is reproducible and resumes bit-exactly whatever ``num_workers`` is.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], config: TrainConfig,
                 accelerator=None, callbacks: Sequence[Callable] = (), identity: Optional[dict] = None):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.config = config
        self.output_dir = Path(config.output_dir)
        # Launched as several processes on a machine without GPUs (`accelerate launch --multi_gpu` or torchrun on a
        # CPU box), Accelerate runs them as MULTI_CPU (gloo) only when told cpu=True.
        cpu_only = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = accelerator or Accelerator(
            cpu=cpu_only, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
            log_with=config.log_with,
            # non_blocking: host -> GPU copies of the (pinned) batches overlap the previous step
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")))
        if self._sharded and not self.accelerator.is_fsdp2:
            # FSDP1 flattens the parameters of the module it wraps, so the unwrapped model the attacks and validation
            # run would see flat shards; FSDP2 (fully_shard) shards in place and runs any forward of the module.
            raise ValueError("casify trains under FSDP2 only: set fsdp_version: 2 in the accelerate config "
                             "(accelerate launch --use_fsdp --fsdp_version 2)")
        set_seed(config.seed)
        if config.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        self.loss = losses.get_loss(config.method, cas=config.cas, beta=config.beta, defaults=config.defaults,
                                    **config.loss_kwargs)
        if config.cas and not isinstance(model, CASModel):
            raise ValueError("config.cas=True needs a CAS-wrapped model (casify.wrap); use cas=False for plain "
                             f"{config.method.upper()}")
        fingerprint = model_fingerprint(model)  # of the model as given, so runs of plain models still resume
        if not isinstance(model, CASModel):  # a wrapped model without CAS: saved and loaded like every casify model
            model = wrap(model, [], normalize=None, input_size=tuple(train_set[0][0].shape))
        self.attack = self.loss.training_attack(eps=config.eps, steps=config.attack_steps,
                                                **({"alpha": config.attack_alpha} if config.attack_alpha else {}))
        self.val_attack = attacks.Attack(name="val-pgd", eps=config.eps, steps=config.val_attack_steps,
                                         objective="cas" if config.cas else "ce", beta=config.beta)
        self.callbacks = list(callbacks)
        self.state = TrainState()
        self.stop = False
        self.identity = {"train": config.identity(), "model": fingerprint,
                         "data": {"train_size": len(train_set), "val_size": len(val_set) if val_set is not None else 0},
                         **json.loads(json.dumps(identity or {}, default=str))}

        generator = torch.Generator().manual_seed(config.seed)
        self.train_data = EpochSeededDataset(train_set, config.seed)
        train_loader = DataLoader(self.train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                  num_workers=config.num_workers, generator=generator,
                                  pin_memory=torch.cuda.is_available())  # not persistent: set_epoch must reach workers
        self.val_loader = None
        if val_set is not None and len(val_set) > 0:
            if config.val_max_examples and len(val_set) > config.val_max_examples:
                val_set = torch.utils.data.Subset(val_set, range(config.val_max_examples))
            self.val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                                         pin_memory=torch.cuda.is_available())
        from timm.optim import param_groups_weight_decay
        # timm's grouping: no weight decay on biases and norm parameters (every parameter with ndim <= 1)
        optimizer = torch.optim.SGD(param_groups_weight_decay(model, config.weight_decay), lr=config.lr,
                                    momentum=config.momentum)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        prepared = self.accelerator.prepare(model, optimizer, train_loader,
                                            *([self.val_loader] if self.val_loader is not None else []))
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.unwrapped = self.accelerator.unwrap_model(self.model)  # without DDP / FSDP containers
        # What each phase runs: compiled once here when asked (the attack's eval-mode graph and the update's
        # train-mode graph are separate compiled callables, so neither evicts the other), plain modules otherwise.
        self.update_model: nn.Module = self._compiled(self.model)
        self.attack_model: nn.Module = self._compiled(self.unwrapped)
        self._compiled_eval: Dict[int, nn.Module] = {}
        self.ema = None
        if config.ema_decay is not None and self._sharded:
            raise ValueError("train.ema_decay is not supported under FSDP: the average is a full copy of the model "
                             "(timm's ModelEmaV3 deep-copies it, and FSDP modules refuse deepcopy); train without "
                             "EMA, or use DDP (accelerate launch --multi_gpu) for EMA runs")
        if config.ema_decay is not None:  # after prepare: the average lives on the training device
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.unwrapped, decay=config.ema_decay)
        if self.val_loader is not None:
            self.val_loader = prepared[3]
        self.steps_per_epoch = len(self.train_loader) // config.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set gives {len(self.train_loader)} batches of {config.batch_size} per "
                             f"process, fewer than grad_accum={config.grad_accum}; lower batch_size")
        total = int(math.ceil(config.epochs * self.steps_per_epoch))
        self.total_steps = min(total, config.max_steps) if config.max_steps is not None else total
        self.identity["train"]["num_processes"] = self.accelerator.num_processes
        self.global_batch_size = config.batch_size * self.accelerator.num_processes * config.grad_accum
        # Not through accelerator.prepare: its AcceleratedScheduler steps num_processes times per call and holds back
        # on steps the fp16 scaler skipped, whereas the rate here follows the optimizer step count. Registered, so
        # save_state / load_state carry its state_dict.
        self.scheduler = lr_scheduler(self.optimizer.optimizer, config, self.steps_per_epoch, self.total_steps)
        self.accelerator.register_for_checkpointing(self.scheduler)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Atomically write ``checkpoints/step-<N>`` (accelerate state + trainer state) and point ``latest`` at it."""
        acc = self.accelerator
        final = self.checkpoint_root / f"step-{self.state.global_step:08d}"
        tmp = self.checkpoint_root / f".tmp-step-{self.state.global_step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        # Accelerate's save_state (and its checkpoint naming/rotation) writes in place, not atomically: hence tmp + rename.
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process has written its part (RNG states, FSDP shards) before the rename
        if acc.is_main_process:
            if self.ema is not None:
                from safetensors.torch import save_file
                save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                          str(tmp / EMA_WEIGHTS))
            (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self.state), indent=1))
            _atomic_replace_dir(tmp, final)
            atomic_write(self.checkpoint_root / "latest", lambda tmp: Path(tmp).write_text(final.name))
            kept = sorted((p for p in self.checkpoint_root.glob("step-*") if p.is_dir()), key=_checkpoint_step)
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Optional[Path]:
        pointer = self.checkpoint_root / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def load_checkpoint(self, path: Path) -> None:
        if not (path / "custom_checkpoint_0.pkl").exists():
            raise RunMismatchError(f"{path} holds no learning-rate scheduler state (written by a casify before "
                                   "torch schedulers): resume it with that casify version, or start afresh")
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            from safetensors.torch import load_file
            if not (path / EMA_WEIGHTS).exists():
                raise RunMismatchError(f"{path} has no {EMA_WEIGHTS}: the run was saved without EMA")
            self.ema.load_state_dict(load_file(str(path / EMA_WEIGHTS), device=str(self.accelerator.device)))
        self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))

    # -- evaluation -----------------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated, selected and saved: the EMA of the weights when ``ema_decay`` is set."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def _compiled(self, module: nn.Module) -> nn.Module:
        if not self.config.compile:
            return module
        return torch.compile(module, backend=self.config.compile_backend, mode=self.config.compile_mode)

    def _to_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last and x.dim() == 4 else x

    def validate(self) -> Dict[str, float]:
        """Natural and PGD accuracy on the held-out split, gathered over processes (of the EMA weights when kept)."""
        base = self.eval_model
        if self.ema is None:
            model = self.attack_model
        else:  # the EMA copy is compiled once too
            model = self._compiled_eval.setdefault(id(base), self._compiled(base))
        was_training = base.training
        model.eval()
        correct_nat = correct_adv = torch.zeros((), dtype=torch.long)
        count = 0
        for i, (x, y) in enumerate(self.val_loader):
            x = self._to_format(x)
            with self.accelerator.autocast():
                x_adv = self.val_attack(model, x, y)
                # the routing the attack ran with (predicted, explicitly), so the scoring reuses one compiled graph
                routed = route(model, labels=None) if routed_modules(model) else contextlib.nullcontext()
                if i == 0 and isinstance(base, CASModel):
                    # a new data source: on a GPU its first clean batch is range-checked too (the attack's first
                    # forward, which the check would otherwise read, sees an iterate clipped to [0, 1])
                    base.recheck_input_range()
                with torch.no_grad(), routed:
                    nat = model(x).argmax(1) == y
                    adv = model(x_adv).argmax(1) == y
            nat, adv = self.accelerator.gather_for_metrics((nat, adv))
            correct_nat = correct_nat.to(nat.device) + nat.sum()  # read back once, after the loop
            correct_adv = correct_adv.to(adv.device) + adv.sum()
            count += nat.numel()
        base.train(was_training)
        return {"val_natural": int(correct_nat) / max(1, count), "val_pgd": int(correct_adv) / max(1, count),
                "val_count": count}

    # -- training -------------------------------------------------------------------------------------------------
    def _write_run_config(self) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {"identity": self.identity, "train": self.config.to_dict(), "loss": self.loss.config(),
                      "attack": self.attack.to_dict() if self.attack else None,
                      "val_attack": self.val_attack.to_dict(), "num_processes": self.accelerator.num_processes,
                      "global_batch_size": self.global_batch_size,
                      "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
            text = json.dumps(record, indent=1, default=str)
            atomic_write(self.output_dir / RUN_RECORD, lambda tmp: Path(tmp).write_text(text))

    def _holds_a_run(self) -> bool:
        return any((self.output_dir / name).exists() for name in (RUN_RECORD, "checkpoints", "best", "final"))

    def _check_output_dir(self, resume: bool, overwrite: bool) -> None:
        """Never reuse or mix another run: resume only the same run, start afresh only over a folder given up for it.

        Every process reads the folder before any process changes it (the barrier), so all decide alike."""
        clear = self._decide_output_dir(resume, overwrite)
        self.accelerator.wait_for_everyone()
        if clear and self.accelerator.is_main_process:
            for name in ("checkpoints", "best", "final", "hub", "logs"):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
            for name in (RUN_RECORD, "summary.json"):
                (self.output_dir / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _decide_output_dir(self, resume: bool, overwrite: bool) -> bool:
        """Whether the old run in ``output_dir`` must be deleted first; raises when the folder holds another run."""
        if not self._holds_a_run():
            return False
        afresh = ("choose another output_dir (the recipes name it after the run by default), or start afresh here "
                  "with resume=False, overwrite=True (recipes: --no_resume --overwrite), which deletes the old run")
        record_path = self.output_dir / RUN_RECORD
        old = None
        if record_path.exists():
            try:
                old = json.loads(record_path.read_text()).get("identity")
            except (json.JSONDecodeError, AttributeError):
                old = None
        if resume:
            if old is None:
                raise RunMismatchError(f"{self.output_dir} holds a run without a readable record of what it is "
                                       f"({RUN_RECORD}); it cannot be resumed safely: {afresh}")
            diff = _differences(old, self.identity)
            if diff:
                shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
                raise RunMismatchError(f"{self.output_dir} holds another run; resuming it would train or publish that "
                                       f"run's weights as this one. What differs: {shown}. To run this one: {afresh}")
            return False
        if not overwrite:
            raise RunMismatchError(f"{self.output_dir} already holds a run and resume=False would mix its checkpoints "
                                   f"and models with this one's: {afresh}")
        return True

    def train(self, resume: bool = True, overwrite: bool = False) -> TrainState:
        """Run to ``total_steps``.

        ``resume``: continue from the latest checkpoint in ``output_dir`` if that folder holds this same run (same
        record in ``run_config.json``), and refuse with :class:`RunMismatchError` if it holds another. ``resume=False``
        refuses a folder that holds a run unless ``overwrite=True``, which deletes that run first.
        """
        from .progress import progress_bar

        acc, cfg = self.accelerator, self.config
        self._check_output_dir(resume, overwrite)
        self._write_run_config()
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
        self._say_if_finished(resume, latest)
        if acc.is_main_process and cfg.progress:
            print(f"casify: global batch {self.global_batch_size} = batch_size {cfg.batch_size} per process x "
                  f"{acc.num_processes} process(es) x grad_accum {cfg.grad_accum}; {self.steps_per_epoch} steps per "
                  f"epoch, {self.total_steps} in all" + (f", resuming at step {self.state.global_step}" if latest else ""))
        if cfg.log_with:
            acc.init_trackers("casify", config=flat_config(cfg.to_dict()))
        # a bar on a terminal; in a log file one line per log_every_steps (casify.progress)
        bar = progress_bar(total=self.total_steps, initial=self.state.global_step,
                           disable=not (cfg.progress and acc.is_local_main_process),
                           desc=f"{cfg.method}{'+cas' if cfg.cas else ''}", every=cfg.log_every_steps,
                           dynamic_ncols=True)
        while self.state.global_step < self.total_steps and not self.stop:
            self.train_loader.set_epoch(self.state.epoch)
            self.train_data.set_epoch(self.state.epoch)  # Accelerate skips the dataset when the sampler has set_epoch
            loader = self.train_loader
            skip = self.state.step_in_epoch * cfg.grad_accum
            if skip:
                loader = acc.skip_first_batches(self.train_loader, skip)
            micro = 0
            window = _MetricWindow()
            for x, y in loader:
                lr = self.scheduler.get_last_lr()[0]
                x = self._to_format(x)
                x_adv = x
                if self.attack is not None:  # eval mode, predicted routing: the attack sets both, restores the mode
                    with acc.autocast():
                        x_adv = self.attack(self.attack_model, x, y)
                self.model.train()
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, metrics = self.loss(self.update_model, x, x_adv, y)
                    acc.backward(loss)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.add({**metrics, "loss": loss})
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                if self.ema is not None:
                    self.ema.update(self.unwrapped, step=self.state.global_step)
                self.scheduler.step()
                self.state.global_step += 1
                self.state.step_in_epoch += 1
                bar.update(1)
                end_of_epoch = self.state.step_in_epoch >= self.steps_per_epoch
                last = self.state.global_step >= self.total_steps
                validating = self.val_loader is not None and (
                    last or (cfg.val_every_steps and self.state.global_step % cfg.val_every_steps == 0)
                    or (not cfg.val_every_steps and end_of_epoch))
                if validating or end_of_epoch or last or self.state.global_step % cfg.log_every_steps == 0:
                    # the means since the last log, read back here only: every other step queues and moves on
                    logged = self._log(window, lr, bar)
                if end_of_epoch:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                if validating:
                    self._validate_and_select(logged)
                if self._checkpoint_due(end_of_epoch, last):
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self)
                if last or self.stop or end_of_epoch:
                    if self.stop and window.count:  # stopped between two logs: log the steps since the last
                        self._log(window, lr, bar)
                    break
        bar.close()
        if self.state.global_step >= self.total_steps:
            self._save_model("final")
        else:  # stopped early (a callback set trainer.stop): a checkpoint to resume from, never a "final" model
            if self.state.global_step and (self.latest_checkpoint() is None or
                                           _checkpoint_step(self.latest_checkpoint()) != self.state.global_step):
                self.save_checkpoint()
        if cfg.log_with:
            acc.end_training()
        return self.state

    def _checkpoint_due(self, end_of_epoch: bool, last: bool) -> bool:
        every = self.config.checkpoint_every_steps
        if every == 0:
            return False
        if every is None:
            return end_of_epoch or last
        return last or self.state.global_step % every == 0

    def _say_if_finished(self, resume: bool, latest: Optional[Path]) -> None:
        """A rerun of a finished run: say that there is nothing to train, or that it trains again from step 0 when
        the run kept no checkpoint to resume from."""
        if not (resume and self.accelerator.is_main_process):
            return
        if latest is not None and self.state.global_step >= self.total_steps:
            print(f"casify: {self.output_dir} holds this run, finished (step {self.state.global_step} of "
                  f"{self.total_steps}): nothing to train; its best/ and final/ models are kept")
        elif latest is None and (self.output_dir / "final").is_dir():
            warnings.warn(f"{self.output_dir} holds this run, finished, but without a checkpoint to resume from "
                          "(train.checkpoint_every_steps=0, or an older casify): it is trained again from step 0 (the "
                          "same seed gives the same weights). Keep the default checkpoint_every_steps (once per "
                          "epoch) to make reruns free", stacklevel=3)

    def _log(self, window: "_MetricWindow", lr: float, bar) -> dict:
        logged = {**window.flush(self.accelerator), "lr": lr, "step": self.state.global_step, "epoch": self.state.epoch}
        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.3g}")
        if self.config.log_with:
            self.accelerator.log(logged, step=self.state.global_step)
        return logged

    def _validate_and_select(self, logged: dict) -> None:
        metrics = self.validate()
        # "loss": the mean training loss over the steps since the previous log (train.log_every_steps)
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": logged.get("loss"), **metrics}
        self.state.history.append(record)
        if self.config.log_with:
            self.accelerator.log(metrics, step=self.state.global_step)
        # Adversarial training selects by robust accuracy; natural training (no attack) by natural accuracy.
        metric = metrics["val_pgd"] if self.attack is not None else metrics["val_natural"]
        if metric > self.state.best_metric:
            self.state.best_metric = metric
            self.state.best_step = self.state.global_step
            self._save_model("best", metrics)

    def _save_model(self, name: str, metrics: Optional[dict] = None) -> None:
        """``save_pretrained`` on the main process (every trained model is a casify model, with or without CAS).

        Under FSDP the parameters are sharded over the processes: every process takes part in gathering the full
        state dict (``accelerator.get_state_dict``), and the main process writes it."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self.eval_model
        state = None
        if self._sharded:  # a collective: every process gathers, the main process gets the full tensors
            state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            folder = self.output_dir / name
            training = TrainingRecord(
                config=self.config.to_dict(), loss=self.loss.config(),
                attack=self.attack.to_dict() if self.attack else None,
                selected_on=(f"held-out validation split ({'robust' if self.attack else 'natural'} accuracy)"
                             if name == "best" else "last step"),
                step=self.state.global_step,
                weights=f"EMA (decay {self.config.ema_decay})" if self.ema is not None else "trained")
            (model if state is None else _FullWeights(model, state)).save_pretrained(
                folder, metrics=metrics, extra={"training": training.to_dict()})
        acc.wait_for_everyone()

    @property
    def _sharded(self) -> bool:
        """Whether the parameters are sharded over the processes (FSDP), so ``state_dict()`` holds shards only."""
        from accelerate.utils import DistributedType
        return self.accelerator.distributed_type == DistributedType.FSDP


class _FullWeights(nn.Module):
    """What ``save_pretrained`` reads from a sharded wrapped model: its config and original, and the gathered full
    state dict in place of ``state_dict()`` (whose tensors are shards under FSDP)."""

    def __init__(self, model: CASModel, state: Dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "casify_config", model.casify_config)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_state", state)

    @property
    def base_model(self) -> nn.Module:
        return self._model.base_model

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def save_pretrained(self, save_directory, **kwargs):
        from .serialization import save_pretrained
        return save_pretrained(self, save_directory, **kwargs)


def train(model: nn.Module, train_set: Dataset, val_set: Optional[Dataset], config: TrainConfig, **kwargs) -> Trainer:
    """Build a :class:`Trainer`, run it (resuming from ``config.output_dir`` when a checkpoint is there), return it."""
    trainer = Trainer(model, train_set, val_set, config, **kwargs)
    trainer.train()
    return trainer
