"""Publishing a wrapped model: ``save_pretrained`` plus a model card, and the upload of exactly those files.

Below the model class (like :mod:`casify.io.serialization`), so ``DefendedModel.push_to_hub`` needs nothing above it.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, Mapping, Optional, Union

from torch import nn

from ..core.config_validation import read_config
from .eval_summary import EvalSummary
from .serialization import CONFIG_NAME, WEIGHTS_NAME, atomic_write, save_pretrained

# What push_to_hub uploads from a folder: the model, its card and evaluation reports, never checkpoints or logs.
UPLOAD_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", "eval_report.json", "eval_report.md")
UPLOAD_SUFFIXES = (".png",)


def upload_patterns(folder: Union[str, os.PathLike]) -> List[str]:
    """The files :func:`push_to_hub` uploads from ``folder``: the model, its card, evaluation reports and figures at
    the top level, by exact name (so a stray ``checkpoints/`` or log next to them stays local)."""
    folder = Path(folder)
    names = [p.name for p in sorted(folder.iterdir()) if p.is_file()
             and (p.name in UPLOAD_FILES or p.name.endswith(UPLOAD_SUFFIXES)) and not re.search(r"[*?\[\]]", p.name)]
    root = folder.resolve()
    for name in names:  # a link planted in the folder must not upload a file from elsewhere (a key, a token)
        target = (folder / name).resolve()
        if (folder / name).is_symlink() and root not in target.parents:
            raise ValueError(f"{folder / name} is a symbolic link to {target}, outside {folder}: casify uploads only "
                             "the files inside the folder; copy the file in instead of linking")
    return names


def write_hub_folder(model: nn.Module, folder: Union[str, os.PathLike], model_name: str, *,
                     evaluation: Union[None, dict, EvalSummary] = None, dataset_name: str = "unknown",
                     dataset_type: str = "unknown", split: str = "test",
                     figures: Optional[Mapping[str, Union[str, os.PathLike]]] = None) -> Path:
    """``save_pretrained`` plus ``README.md`` (the model card): exactly the files :func:`push_to_hub` uploads.

    ``evaluation``: an ``EvalReport.summary()`` (or its ``summary_record()``), stored as the config's ``metrics``
    and read by the card; a malformed one is a ValueError naming the field, raised before anything is written.
    ``figures``: figure kind -> PNG (``EvalReport.figures`` after ``report.save(folder)``, or paths elsewhere,
    copied in): shown on the card and uploaded with it."""
    from .model_card import make_model_card

    folder = Path(folder)
    names = {}
    for kind, path in (figures or {}).items():
        source = Path(path) if Path(path).is_absolute() or Path(path).exists() else folder / Path(path).name
        if not source.is_file() or source.suffix != ".png":
            raise ValueError(f"figure {kind!r}: {source} is not a PNG file")
        folder.mkdir(parents=True, exist_ok=True)
        if source.resolve() != (folder / source.name).resolve():
            shutil.copyfile(source, folder / source.name)
        names[kind] = source.name
    if isinstance(evaluation, EvalSummary):
        evaluation = evaluation.to_dict()
    elif evaluation:
        EvalSummary.from_dict(evaluation, "evaluation")
    save_pretrained(model, folder, metrics=evaluation)
    config = read_config(folder / CONFIG_NAME)  # the card describes what was written, as from_pretrained reads it
    card = make_model_card(config, model_name, evaluation, dataset_name, dataset_type, split, figures=names,
                           folder=str(folder))
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(str(card)))
    return folder


def push_to_hub(model: nn.Module, repo_id: str, *, evaluation: Union[None, dict, EvalSummary] = None,
                dataset_name: str = "unknown", dataset_type: str = "unknown", split: str = "test",
                private: bool = False, token=None, commit_message: str = "Upload robust model trained with casify",
                folder: Optional[os.PathLike] = None, figures: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
                force: bool = False):
    """Save the model with a model card (evaluation results in the ``model-index`` metadata) and upload it.

    The guards of ``casify push``, before anything is written: a model whose evaluation flagged gradient masking or
    reads chance accuracy is refused (:class:`~casify.io.publish_guard.PublishRefused`) unless ``force=True``; then the
    Hub must be reachable and the token able to write to ``repo_id``
    (:class:`~casify.io.hub_access.HubAccessError`). Without ``evaluation`` the card carries no robustness results
    (a warning says so).

    ``folder``: where to stage the files (kept); by default a temporary directory. Only the model files, the card and
    evaluation reports are uploaded from it (:func:`upload_patterns`), never whatever else is there. Returns the
    commit info. ``figures``: as for :func:`write_hub_folder` (uploaded with the card, shown on it).
    """
    check_before_pushing(model, repo_id, evaluation, token=token, force=force)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(folder) if folder is not None else Path(tmp)
        write_hub_folder(model, staging, repo_id, evaluation=evaluation, dataset_name=dataset_name,
                         dataset_type=dataset_type, split=split, figures=figures)
        return upload_folder(staging, repo_id, private=private, token=token, commit_message=commit_message)


def check_before_pushing(model: nn.Module, repo_id: str, evaluation: Union[None, dict, EvalSummary], *, token=None,
                         force: bool = False) -> None:
    """What ``casify push`` checks, for the Python API: the model's evaluation (masking, chance) unless ``force``,
    then the Hub access; a model with no evaluation is pushed with a warning."""
    import warnings

    from .hub_access import check_hub_access
    from .publish_guard import PublishRefused, publish_refusal

    metrics = evaluation.to_dict() if isinstance(evaluation, EvalSummary) else evaluation
    if metrics is None:
        metrics = (getattr(model, "casify_config", None) or {}).get("metrics")
    num_classes = ((getattr(model, "casify_config", None) or {}).get("cas") or {}).get("num_classes")
    reason = publish_refusal(metrics, num_classes)
    if reason and not force:
        raise PublishRefused(f"not pushing to {repo_id}: {reason}. To publish it anyway: push_to_hub(..., "
                             "force=True)")
    if metrics is None:
        warnings.warn(f"pushing to {repo_id} without an evaluation: the model card will state no robust accuracy; "
                      "pass evaluation=casify.evaluate(...).summary()", stacklevel=3)
    check_hub_access(repo_id, token)


def upload_folder(folder: Union[str, os.PathLike], repo_id: str, *, private: bool = False, token=None,
                  commit_message: str = "Upload robust model trained with casify"):
    """Create ``repo_id`` if needed and upload the files of ``folder`` that :func:`upload_patterns` names."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             allow_patterns=upload_patterns(folder))
