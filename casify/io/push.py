"""``casify push FOLDER REPO_ID`` and the end of a ``--push_to_hub`` run: publish a saved folder, or say why not.

Why: the upload is the one step that needs the network, and it comes last. What the model's own evaluation says is
checked first (:mod:`casify.io.publish_guard`), then the Hub access (:mod:`casify.io.hub_access`); a failed upload keeps the
folder and prints the one command that publishes it later.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Union

from ..core.config_validation import read_config
from .hub_access import check_hub_access
from .publish import upload_folder
from .publish_guard import PublishRefused, publish_refusal  # noqa: F401  (PublishRefused: re-exported)
from .serialization import CONFIG_NAME, WEIGHTS_NAME, verify_weights


class PushFailed(RuntimeError):
    """The upload failed; the folder is kept and the message holds the command that retries it."""


def push_command(folder: Union[str, os.PathLike], repo_id: str, force: bool = False) -> str:
    return f"casify push {shlex.quote(str(folder))} {shlex.quote(repo_id)}" + (" --force" if force else "")


def check_publishable(folder: Union[str, os.PathLike], repo_id: str, force: bool = False) -> dict:
    """The folder's checked config, if it may be pushed; else :class:`PublishRefused` saying why and how to force."""
    folder = Path(folder)
    config = read_config(folder / CONFIG_NAME)
    verify_weights(folder / WEIGHTS_NAME, config)
    reason = publish_refusal(config.get("metrics"), (config.get("cas") or {}).get("num_classes"))
    if reason and not force:
        raise PublishRefused(f"not pushing {folder}: {reason}. To publish it anyway: "
                             f"{push_command(folder, repo_id, force=True)}")
    return config


def push_folder(folder: Union[str, os.PathLike], repo_id: str, *, private: bool = False, force: bool = False,
                token=None, commit_message: str = "Upload robust model trained with casify", retry_hint: bool = True):
    """Check the model (:func:`check_publishable`) and the Hub access, then upload the folder's model files.
    ``retry_hint``: a failed upload names the ``casify push`` command that retries it (``casify push`` itself passes
    False: the advice would be the command just run)."""
    check_publishable(folder, repo_id, force)
    check_hub_access(repo_id, token, later=None)  # the folder exists already: "publish it later" is this very call
    try:
        return upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        retry = (f"Push it later with: {push_command(folder, repo_id, force)}" if retry_hint
                 else "Nothing was uploaded; run the same command again once the Hub answers")
        raise PushFailed(f"the upload to {repo_id} failed ({type(e).__name__}: {first}); the folder is kept at "
                         f"{folder}. {retry}") from e


def push_run_folder(folder: Union[str, os.PathLike], repo_id: str, *, private: bool = False, force: bool = False,
                    commit_message: str = "Upload robust model trained with casify") -> bool:
    """The end of a ``--push_to_hub`` run: push the run's hub/ folder, or keep it and say on stderr why and how to
    push it later. Whether it was pushed; the run that trained the model never fails at its last step."""
    try:
        push_folder(folder, repo_id, private=private, force=force, commit_message=commit_message)
    except (PublishRefused, PushFailed) as e:
        print(f"casify: {e}", file=sys.stderr)
        return False
    except Exception as e:  # the Hub went away since the check before training
        print(f"casify: the push to {repo_id} failed ({type(e).__name__}: {e}); the folder is kept. Push it "
              f"later with: {push_command(folder, repo_id)}", file=sys.stderr)
        return False
    print(f"casify: pushed {folder} to https://huggingface.co/{repo_id}")
    return True
