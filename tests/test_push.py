"""Publishing fails fast and safely: the Hub and the token are checked before training, a refused or failed push
keeps the folder and prints the command, and a model its own evaluation distrusts needs --force. Offline: the Hub's
answers are stand-ins."""
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

import casify
import casify_cli
from casify.io.hub_access import HubAccessError, check_hub_access
from casify.io.publish_guard import publish_refusal
from casify.io.push import PublishRefused, PushFailed, push_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "digits_tiny_at_cas.yaml"
WRITE = {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}


@pytest.fixture
def hub(monkeypatch):
    """Stand-ins for the three Hub calls; ``hub.me`` is what whoami answers (an exception is raised)."""
    class Hub:
        me = WRITE
        uploads = []
        fail_upload = None

    def whoami(self, *args, **kwargs):
        if isinstance(Hub.me, Exception):
            raise Hub.me
        return Hub.me

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        if Hub.fail_upload:
            raise Hub.fail_upload
        Hub.uploads.append((repo_id, sorted(allow_patterns)))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    Hub.uploads = []
    return Hub


def _folder(tmp_path, natural=0.9, masking=False, n=200):
    from conftest import TinyNet
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), ["stem"], input_size=(3, 8, 8), normalize=None)
    evaluation = {"eps": 8 / 255, "n": n, "accuracy": {"natural": natural, "worst_case": natural / 2},
                  "gradient_masking_suspected": masking, "failed_checks": ["eps_monotone"] if masking else []}
    return casify.write_hub_folder(model, tmp_path / "hub", "tiny", evaluation=evaluation)


def test_access_is_checked_with_what_to_do(hub, monkeypatch):
    assert check_hub_access("me/model") == "me" and check_hub_access("lab/model") == "me"
    with pytest.raises(HubAccessError, match="not 'someone' nor a member"):
        check_hub_access("someone/model")
    hub.me = {**WRITE, "auth": {"accessToken": {"role": "read"}}}
    with pytest.raises(HubAccessError, match="can only read"):
        check_hub_access("me/model")
    hub.me = ConnectionError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(HubAccessError, match="cannot reach the Hugging Face Hub.*casify push FOLDER REPO_ID"):
        check_hub_access("me/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        check_hub_access("me/model")


def test_a_run_without_the_hub_fails_before_training(hub, tmp_path, capsys):
    hub.me = ConnectionError("no network")
    out = tmp_path / "run"
    assert casify_cli.main(["train", "--method", "at", "--config", str(TINY), "--output_dir", str(out),
                            "--push_to_hub", "--hub_model_id", "me/x"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert not out.exists()


def test_push_uploads_the_model_files(hub, tmp_path, capsys):
    folder = _folder(tmp_path)
    assert casify_cli.main(["push", str(folder), "me/tiny"]) == 0
    assert hub.uploads == [("me/tiny", ["README.md", "config.json", "model.safetensors"])]


def test_a_model_flagged_for_masking_or_at_chance_needs_force(hub, tmp_path, capsys):
    masked = _folder(tmp_path / "a", masking=True)
    assert casify_cli.main(["push", str(masked), "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "gradient masking" in err and f"casify push {masked} me/tiny --force" in err and not hub.uploads
    assert casify_cli.main(["push", str(masked), "me/tiny", "--force"]) == 0 and len(hub.uploads) == 1
    chance = _folder(tmp_path / "b", natural=0.22)  # TinyNet has 5 classes: 20 % is chance
    with pytest.raises(PublishRefused, match="at chance"):
        push_folder(chance, "me/tiny")
    assert publish_refusal({"accuracy": {"natural": 0.5}, "n": 200}, 5) is None
    assert publish_refusal(None, 5) is None


def test_a_failed_upload_keeps_the_folder_and_names_the_command(hub, tmp_path):
    folder = _folder(tmp_path)
    hub.fail_upload = ConnectionError("connection reset")
    with pytest.raises(PushFailed, match=f"kept at {folder}.*casify push {folder} me/tiny"):
        push_folder(folder, "me/tiny")
    assert (folder / "model.safetensors").exists()


# -- the Python API has the same guards ------------------------------------------------------------------------------
def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), ["stem"], input_size=(3, 8, 8), normalize=None)


def _evaluation(natural=0.9, masking=False, n=200):
    return {"eps": 8 / 255, "n": n, "accuracy": {"natural": natural, "worst_case": natural / 2},
            "gradient_masking_suspected": masking, "failed_checks": ["eps_monotone"] if masking else []}


def test_push_to_hub_checks_the_token_and_the_network_before_writing_or_uploading(hub, tmp_path):
    staging = tmp_path / "staging"
    hub.me = ConnectionError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(HubAccessError, match="cannot reach the Hugging Face Hub"):
        casify.push_to_hub(_model(), "me/tiny", evaluation=_evaluation(), folder=staging)
    from huggingface_hub.errors import LocalTokenNotFoundError
    hub.me = LocalTokenNotFoundError("no token")
    with pytest.raises(HubAccessError, match="no Hugging Face token"):
        _model().push_to_hub("me/tiny", evaluation=_evaluation(), folder=staging)  # the method too
    assert not staging.exists() and hub.uploads == []
    hub.me = WRITE
    casify.push_to_hub(_model(), "me/tiny", evaluation=_evaluation(), folder=staging)
    assert hub.uploads and hub.uploads[0][0] == "me/tiny"


@pytest.mark.parametrize("evaluation, reason", [(_evaluation(natural=0.2), "at chance for 5 classes"),
                                                (_evaluation(masking=True), "flagged gradient masking")])
def test_push_to_hub_refuses_a_model_its_evaluation_distrusts_unless_forced(hub, tmp_path, evaluation, reason):
    with pytest.raises(PublishRefused, match=rf"not pushing to me/tiny: its .*{reason}.*force=True"):
        casify.push_to_hub(_model(), "me/tiny", evaluation=evaluation, folder=tmp_path / "s")
    assert hub.uploads == [] and not (tmp_path / "s").exists()
    casify.push_to_hub(_model(), "me/tiny", evaluation=evaluation, folder=tmp_path / "s", force=True)
    assert len(hub.uploads) == 1


def test_push_to_hub_without_an_evaluation_warns(hub, tmp_path):
    with pytest.warns(UserWarning, match="without an evaluation: the model card will state no robust accuracy"):
        casify.push_to_hub(_model(), "me/tiny", folder=tmp_path / "s")
    assert len(hub.uploads) == 1


def test_casify_push_never_advises_running_casify_push(hub, tmp_path, capsys):
    """A refusal of ``casify push`` once said "... publish the run's hub/ folder later with `casify push FOLDER
    REPO_ID`": the very command that failed. Before a training run that advice stays (train now, push later)."""
    folder = _folder(tmp_path)
    hub.me = ConnectionError("no network")
    assert casify_cli.main(["push", str(folder), "me/tiny"]) == 1
    err = capsys.readouterr().err
    advice = err.split("error:", 1)[1]  # the message after "casify push: error:"
    assert "cannot reach the Hugging Face Hub" in advice and "casify push" not in advice
    with pytest.raises(HubAccessError, match="casify push FOLDER REPO_ID"):  # before training: still advised
        check_hub_access("me/tiny")
    hub.me = WRITE
    hub.fail_upload = ConnectionError("connection reset")
    assert casify_cli.main(["push", str(folder), "me/tiny"]) == 1
    err = capsys.readouterr().err
    advice = err.split("error:", 1)[1]
    assert "upload to me/tiny failed" in advice and "casify push" not in advice and "same command again" in advice
