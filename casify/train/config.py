"""What decides a run (:class:`TrainConfig`), where a run is (:class:`TrainState`) and how a saved model was trained
(:class:`TrainingRecord`): the typed values the rest of training passes around."""
from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


from ..attacks.constants import SINGLE_STEP_ATTACKS, TRAINING_ATTACKS
from ..core.eps import parse_eps
from .trackers import check_log_with

SCHEDULES = ("multistep", "cosine", "constant")
METHODS = ("standard", "at", "trades", "mart")
OPTIONAL_FIELDS = ("compile_mode", "ema_decay", "attack_alpha", "attack_steps", "max_steps", "val_every_steps", "val_max_examples", "checkpoint_every_steps", "log_with")
# TrainConfig fields that say where and how a run is logged, not what it computes: a rerun may change them.
NOT_IDENTITY = ("output_dir", "progress", "log_with", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "num_workers", "cudnn_benchmark")
# Settings added after run folders existed, with the value every earlier run had: left out of the identity at that value,
# so a folder written before them resumes (the full config, with them, is still in run_config.json's "train").
ADDED_LATER = {"attack": "pgd", "overfit_guard": True, "freeze_bn_stats": False, "eps_warmup_steps": 0}
PGD_ALPHA = 2 / 255  # the PGD step when train.attack_alpha is not set (what every run before train.attack used)
PGD_STEPS = 10
RUN_RECORD = "run_config.json"
EMA_WEIGHTS = "ema.safetensors"


class RunMismatchError(RuntimeError):
    """An output folder holds another run than the one asked for; resuming it would reuse or mix another run."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: a damaged checkpoint, a full disk, a file in its place, a name the
    file system refuses, or another process training into it. The message is the whole story (one line)."""


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
    # The training attack: "pgd" (attack_steps steps, default 10, of attack_alpha, default 2/255), or a single-step
    # one: "fgsm" (no random start), "fgsm_rs" (Wong et al. 2020) or "n_fgsm" (de Jorge et al. 2022), each with its
    # paper's step unless attack_alpha is set (fgsm and n_fgsm: eps; fgsm_rs: 1.25 eps); attack_steps must then be 1
    attack: str = "pgd"
    attack_steps: Optional[int] = None
    attack_alpha: Optional[float] = None
    # The training attack's radius grows linearly from eps / eps_warmup_steps to eps over the first eps_warmup_steps
    # optimizer steps (its step size in proportion); validation always attacks at eps. A curriculum for runs that fail
    # at the full eps from the first step (N-FGSM's authors warm eps up on SVHN). On EfficientNet-Lite0 with frozen
    # batch-norm statistics it slowed but did not stop AT from silencing every pooled feature
    # (studies/lite0_cifar10/pilot.py, dead_units.py).
    eps_warmup_steps: int = 0
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
    # Catastrophic overfitting (casify.train.overfit_guard): the collapse is always detected, warned about and recorded;
    # true: best/ then stays the checkpoint selected before the collapse; false: selection goes on by PGD accuracy
    overfit_guard: bool = True
    compile: bool = False  # torch.compile the model once for the update and once for the attacks
    compile_mode: Optional[str] = None  # torch.compile's mode: None (default), "reduce-overhead", "max-autotune"
    compile_backend: str = "inductor"
    # Batch-norm layers normalise with their running statistics in the update too (as in the attack, which runs in
    # eval mode, and at test) and do not update them; their affine weights still train. For fine-tuning a pretrained
    # network on data whose statistics differ from its pretraining data: there, batch statistics make the trained
    # network another function than the one the attack crafted its examples against (EfficientNet-Lite0 on CIFAR-10
    # at 64 px: pooled features of mean cosine 0.30 between the two modes; studies/lite0_cifar10/fine_tune_checks.py).
    freeze_bn_stats: bool = False
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
        self._resolve_attack()
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
        if self.eps_warmup_steps < 0:
            raise ValueError(f"eps_warmup_steps must be >= 0 (0: the full eps from the first step), got "
                             f"{self.eps_warmup_steps}")
        if self.eps_warmup_steps and self.method == "standard":
            raise ValueError("eps_warmup_steps warms up the training attack's radius; natural training (method "
                             "'standard') has no attack: set it to 0 or choose an adversarial method")
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
            if default is None or value is None and f.name in OPTIONAL_FIELDS or isinstance(default, str) and isinstance(value, str):
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

    def _resolve_attack(self) -> None:
        """The training attack's name and budget: an unknown name is refused with the closest one, a single-step
        attack with more than one step is refused (not run as one step), and unset settings take the attack's own."""
        if not isinstance(self.attack, str) or self.attack not in TRAINING_ATTACKS:
            close = difflib.get_close_matches(str(self.attack), TRAINING_ATTACKS, n=1, cutoff=0.5)
            raise ValueError(f"train.attack {self.attack!r} is not a training attack"
                             + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (known: {', '.join(TRAINING_ATTACKS)})")
        if self.method == "standard" and self.attack != "pgd":
            raise ValueError(f"train.attack {self.attack!r} with method standard: natural training runs no attack; "
                             "choose method at, trades or mart, or leave train.attack out")
        steps = self.attack_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"train.attack_steps must be an integer >= 1 (or null: the attack's own), got {steps!r}")
        if self.attack in SINGLE_STEP_ATTACKS:
            if steps is not None and steps != 1:
                raise ValueError(f"train.attack {self.attack!r} is a single-step attack but train.attack_steps is "
                                 f"{steps}: set attack_steps to 1 (or leave it out), or use attack: pgd for "
                                 f"{steps} steps")
            self.attack_steps = 1
        else:
            self.attack_steps = PGD_STEPS if steps is None else steps
            if self.attack_alpha is None:
                self.attack_alpha = PGD_ALPHA
        if self.attack_alpha is not None and not self.attack_alpha > 0:
            raise ValueError(f"train.attack_alpha must be above 0 (e.g. 2/255), or null for the attack's own step; "
                             f"got {self.attack_alpha!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def identity(self) -> dict:
        """The settings that change what a run computes (everything but where and how it is logged)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in NOT_IDENTITY and not (k in ADDED_LATER and v == ADDED_LATER[k])}


def _suggesting_init(cls):
    """Wrap a dataclass's ``__init__`` so that an unknown keyword names the closest field (``TrainConfig(methd=...)``:
    did you mean ``method``?) instead of Python's bare "unexpected keyword argument"."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are: {', '.join(names)}"
            raise TypeError(f"{cls.__name__} has no setting {key!r}; {hint}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


_suggesting_init(TrainConfig)


@dataclass


class TrainState:
    """Where a run is: restored on resume."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    history: List[dict] = field(default_factory=list)
    overfitting: Optional[dict] = None  # the guard's record of a catastrophic overfitting (casify.train.overfit_guard)


@dataclass


class TrainingRecord:
    """How a saved model was trained: the ``training`` entry of its ``config.json`` (read by the model card)."""
    config: dict
    loss: dict
    attack: Optional[dict]
    selected_on: str
    step: int
    weights: str
    code: Optional[dict] = None  # casify's version and git commit (casify.core.code_version)
    overfitting: Optional[dict] = None  # the guard's record, when the run overfitted catastrophically

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("code", "overfitting"):  # unset (no code record, no collapse): read as before they existed
            if d[key] is None:
                del d[key]
        return d
