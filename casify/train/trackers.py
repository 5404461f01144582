"""Experiment trackers (``train.log_with``): checked when the settings are read, fed a config they accept.

Why: Accelerate only warns about a tracker that is not installed and learns about an unknown one after the model is
built, and TensorBoard's hparams refuse nested dicts, lists and None; so a run either logged nothing or crashed at its
first step. Here an unknown or missing tracker is an error naming the fix before anything is built, and the run's
settings are flattened to ``section.key`` scalars.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Union

SCALARS = (bool, int, float, str)

INSTALL = {"tensorboard": 'pip install "casify-robust[tensorboard]" (or pip install tensorboard)',
           "comet_ml": "pip install comet-ml"}


def known_trackers() -> List[str]:
    """The tracker names Accelerate knows (``all`` aside)."""
    from accelerate.utils import LoggerType
    return sorted(t.value for t in LoggerType if t.value != "all")


def check_log_with(log_with: Union[None, str, List[str]]) -> Optional[List[str]]:
    """The trackers as a list (None: no logging), each known to Accelerate and importable; else a ValueError that
    says what to install or which names exist."""
    if log_with is None:
        return None
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    import accelerate.utils as utils
    known = known_trackers()
    for name in names:
        if name not in known:
            raise ValueError(f"train.log_with={name!r} is not a tracker Accelerate knows; choose from {known}, or "
                             "drop it (the validation history is in summary.json and each model's config.json)")
        available = getattr(utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise ValueError(f"train.log_with={name!r}, but {name} is not installed: "
                             f"{INSTALL.get(name, f'pip install {name}')}, or drop train.log_with")
    return names


def flat_config(config: dict, prefix: str = "") -> Dict[str, Union[bool, int, float, str]]:
    """``{"a": {"b": 1}, "c": [1, 2], "d": None}`` -> ``{"a.b": 1, "c": "[1, 2]", "d": "none"}``: what every tracker
    accepts as hyperparameters (TensorBoard's hparams take int, float, str and bool only)."""
    flat: Dict[str, Union[bool, int, float, str]] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, SCALARS):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat
