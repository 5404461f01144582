"""Before hours of training: can this machine reach the Hub, and can its token write to the repo?

Why: ``--push_to_hub`` used to train and evaluate, then die at the upload with a raw connection error. The checks
here run before anything is built and fail with what to do. They ask the Hub who the token belongs to (one request);
a token that can only read, or belongs to a user outside the repo's namespace, is refused. Fine-grained tokens are
accepted as they are (their scopes are per repo and only the upload can tell).
"""
from __future__ import annotations

import os
from typing import Optional

LATER = "or train without --push_to_hub and publish the run's hub/ folder later with `casify push FOLDER REPO_ID`"


class HubAccessError(RuntimeError):
    """The Hub cannot be reached, or the token cannot write to the repo."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_access(repo_id: str, token: Optional[str] = None, later: Optional[str] = LATER) -> str:
    """The user name the token belongs to, if it can write to ``repo_id``; else :class:`HubAccessError`. ``later``:
    the way round a refusal that each message ends with (before a training run: publish afterwards with ``casify
    push``); None where that would only repeat the command that failed (``casify push`` itself)."""
    from huggingface_hub import HfApi
    later = f", {later}" if later else ""
    from huggingface_hub.errors import LocalTokenNotFoundError

    if _offline():
        raise HubAccessError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be pushed to: unset it{later}")
    try:
        me = HfApi(token=token).whoami()
    except LocalTokenNotFoundError:
        raise HubAccessError(f"no Hugging Face token on this machine: run `hf auth login` (a token with write access) "
                             f"or set HF_TOKEN{later}") from None
    except Exception as e:  # network down, DNS, proxy, an invalid token (401), rate limits
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubAccessError(f"cannot reach the Hugging Face Hub to check the token ({type(e).__name__}: {first}): "
                             f"check the network (or HF_ENDPOINT) and the token{later}") from None
    user = me.get("name", "?")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError(f"the Hugging Face token of {user} can only read: create one with write access at "
                             f"https://huggingface.co/settings/tokens and run `hf auth login`{later}")
    namespace = repo_id.split("/", 1)[0]
    orgs = {org.get("name") for org in me.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        raise HubAccessError(f"the token belongs to {user}, who is not {namespace!r} nor a member of it: push to "
                             f"{user}/{repo_id.split('/', 1)[-1]} or log in as {namespace}{later}")
    return user
