"""Publishing: every file that would be uploaded is real and checked; only the upload call itself is replaced."""
import shutil
from pathlib import Path

from types import SimpleNamespace

import httpx2
import huggingface_hub
import huggingface_hub._snapshot_download
import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

import casify
import casify.model.loading
from casify import LoadError


class FakeHub:
    """The Hub without a network: huggingface_hub's own ``snapshot_download`` runs (revision to commit, the tree
    listing filtered by ``allow_patterns``, the cache layout, the offline lookup of ``local_files_only``); only its
    network calls are replaced. ``HfApi.repo_info`` and ``HfApi.list_repo_tree`` answer from ``remote`` (a folder of
    the repo's files; None: the network is off, a ConnectError), and each file download copies a file from ``remote``
    into the cache (``cache``, in place of ~/.cache/huggingface/hub).

    ``snapshots``: the arguments of every ``snapshot_download`` call; ``api_calls``: the Hub API calls made;
    ``downloaded``: the files fetched from the remote, in order."""
    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, monkeypatch, cache, remote=None, repo_id="someone/tiny-cas"):
        self.remote, self.repo_id = remote, repo_id
        self.snapshots, self.api_calls, self.downloaded = [], [], []
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        real_snapshot_download = huggingface_hub.snapshot_download
        hub = self

        def snapshot_download(repo_id, **kwargs):
            hub.snapshots.append(dict(kwargs, repo_id=repo_id))
            return real_snapshot_download(repo_id, **kwargs)

        def repo_info(api, repo_id, **kwargs):
            hub.api_calls.append(("repo_info", repo_id, kwargs.get("revision")))
            hub._online(repo_id)
            return SimpleNamespace(sha=hub.COMMIT)

        def list_repo_tree(api, repo_id, **kwargs):
            hub.api_calls.append(("list_repo_tree", repo_id, kwargs.get("revision")))
            hub._online(repo_id)
            return [RepoFile(path=p.name, size=p.stat().st_size, oid="0" * 40) for p in sorted(remote.iterdir())]

        def hf_hub_download(repo_id, filename, *, revision, cache_dir, **kwargs):  # offline-ok: the stand-in
            hub._online(repo_id)
            assert revision == hub.COMMIT  # snapshot_download pins every file to the commit it resolved
            target = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / revision
            if not (target / filename).is_file():  # as hf_hub_download: a file of a commit in the cache is not fetched
                hub.downloaded.append(filename)
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(remote / filename, target / filename)
            return str(target / filename)

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(HfApi, "repo_info", repo_info)
        monkeypatch.setattr(HfApi, "list_repo_tree", list_repo_tree)
        monkeypatch.setattr(huggingface_hub._snapshot_download, "hf_hub_download", hf_hub_download)

    def _online(self, repo_id):
        if self.remote is None:
            raise httpx2.ConnectError("network is off in the tests")
        assert repo_id == self.repo_id


def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)


def _copy_as_uploaded(folder_path, remote, kwargs):
    """Copy what upload_folder would upload, filtered by huggingface_hub's own pattern matching."""
    files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
    kept = list(filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                    ignore_patterns=kwargs.get("ignore_patterns")))
    for name in kept:
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(folder_path) / name, remote / name)
    return sorted(kept)


EVAL = {"eps": 8 / 255, "eps_str": "8/255", "norm": "linf", "n": 100,
        "accuracy": {"natural": 0.9, "fgsm": 0.6, "pgd20": 0.45, "cw20": 0.44}}


def _writable_hub(monkeypatch):
    """push_to_hub checks the token first (casify.io.hub_access): a token of 'someone' that can write."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "someone",
                                                                "auth": {"accessToken": {"role": "write"}}})


def test_push_uploads_a_loadable_folder_with_a_model_index(tmp_path, monkeypatch):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        _copy_as_uploaded(folder_path, tmp_path / "remote", kwargs)
        return "commit"

    _writable_hub(monkeypatch)
    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = _model()
    assert casify.push_to_hub(model, "someone/tiny-cas", evaluation=EVAL, dataset_name="digits") == "commit"
    remote = tmp_path / "remote"
    assert uploaded["repo_id"] == uploaded["created"] == "someone/tiny-cas"
    assert sorted(p.name for p in remote.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    text = (remote / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "casify"
    results = meta["model-index"][0]["results"]
    values = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    assert values["natural accuracy"] == 90.0 and values["pgd20 accuracy (linf, eps=8/255)"] == 45.0
    assert "CAS layers:** block" in text

    # from_pretrained("user/repo") goes through snapshot_download; the fake Hub serves the uploaded files
    hub = FakeHub(monkeypatch, tmp_path / "cache", remote)
    from conftest import TinyNet
    loaded = casify.from_pretrained("someone/tiny-cas", model=TinyNet())
    model.eval(), loaded.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the config first and alone, then the weights of the same commit; the card (README.md) is never downloaded
    assert [s["allow_patterns"] for s in hub.snapshots] == [["config.json"], ["model.safetensors"]]
    assert [s["revision"] for s in hub.snapshots] == [None, FakeHub.COMMIT]
    assert hub.downloaded == ["config.json", "model.safetensors"]


def test_a_hub_model_loads_offline_from_the_cache_and_only_from_it(tmp_path, monkeypatch):
    from conftest import TinyNet
    model = _model()
    model.save_pretrained(tmp_path / "remote")
    (tmp_path / "remote" / "README.md").write_text("the card")
    (tmp_path / "remote" / "other.bin").write_bytes(b"not casify's")
    hub = FakeHub(monkeypatch, tmp_path / "cache", tmp_path / "remote")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match=r"no local folder 'someone/tiny-cas'.*HF_HUB_OFFLINE is set.*"
                                        r"LocalEntryNotFoundError"):
        casify.from_pretrained("someone/tiny-cas", model=TinyNet())
    assert hub.api_calls == [] and hub.snapshots[-1]["local_files_only"] is True

    monkeypatch.delenv("HF_HUB_OFFLINE")
    casify.model.loading.load_config("someone/tiny-cas")  # online: the config alone reaches the cache
    assert hub.downloaded == ["config.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match=r"'someone/tiny-cas' could not be read \(HF_HUB_OFFLINE is set.*"
                                        r"IncompleteSnapshotError.*missing \(model.safetensors\)"):
        casify.from_pretrained("someone/tiny-cas", model=TinyNet())

    monkeypatch.delenv("HF_HUB_OFFLINE")
    casify.from_pretrained("someone/tiny-cas", model=TinyNet())
    assert hub.downloaded == ["config.json", "model.safetensors"]  # README.md and other.bin stay on the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = len(hub.api_calls)
    loaded = casify.from_pretrained("someone/tiny-cas", model=TinyNet())  # from the cache, without the network
    assert len(hub.api_calls) == calls and hub.downloaded == ["config.json", "model.safetensors"]
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_hub_repo_without_the_casify_files_is_explained(tmp_path, monkeypatch):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "pytorch_model.bin").write_bytes(b"a pickle casify never reads")
    hub = FakeHub(monkeypatch, tmp_path / "cache", tmp_path / "remote")
    with pytest.raises(LoadError, match=r"the Hub repo 'someone/tiny-cas' has no config.json; is it a repo written "
                                        r"by casify's push_to_hub"):
        casify.from_pretrained("someone/tiny-cas")
    assert hub.downloaded == []


def test_write_hub_folder_without_evaluation(tmp_path):
    folder = casify.write_hub_folder(_model(), tmp_path / "out", "me/model")
    card = (Path(folder) / "README.md").read_text()
    assert "No evaluation was recorded" in card and "model-index" not in card


def test_push_with_a_folder_uploads_only_the_model_card_and_reports(tmp_path, monkeypatch):
    """A staging folder that already holds checkpoints, logs and secrets: only the published files leave it."""
    calls = []

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(kwargs)
        return _copy_as_uploaded(folder_path, tmp_path / "remote", kwargs)

    _writable_hub(monkeypatch)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    staging = tmp_path / "run"
    (staging / "checkpoints" / "step_100").mkdir(parents=True)
    (staging / "checkpoints" / "step_100" / "model.safetensors").write_bytes(b"optimizer and RNG state")
    (staging / "checkpoints" / "README.md").write_text("not the card")
    (staging / "checkpoints" / "curve.png").write_bytes(b"png")
    (staging / ".env").write_text("HF_TOKEN=secret")
    (staging / "train.log").write_text("log")
    (staging / "eval_report.json").write_text("{}")
    (staging / "eval_report.md").write_text("# report")
    (staging / "channel_magnitude.png").write_bytes(b"png")
    uploaded = casify.push_to_hub(_model(), "someone/tiny-cas", evaluation=EVAL, folder=staging)
    assert uploaded == ["README.md", "channel_magnitude.png", "config.json", "eval_report.json", "eval_report.md",
                        "model.safetensors"]
    assert calls[0]["allow_patterns"]  # an explicit allow-list, never "everything in the folder"
    assert (staging / "checkpoints" / "step_100" / "model.safetensors").exists()  # kept locally, just not uploaded


def _card(model, tmp_path):
    folder = casify.write_hub_folder(model, tmp_path / "out", "me/model")
    card = (Path(folder) / "README.md").read_text()
    return card, yaml.safe_load(card.split("---")[1])


def test_card_of_an_untrained_wrap_does_not_claim_fine_tuning(tmp_path):
    card, meta = _card(_model(), tmp_path)
    assert "not fine-tuned by casify" in card
    assert "adversarially fine-tuned" not in card and "Method: NONE" not in card and "NONE" not in card
    assert "base_model" not in meta  # a custom architecture has no Hub repo
    assert "https://pypi.org/project/casify-robust/" in card and "pypi.org/project/casify/" not in card


def test_card_names_timm_bases_by_architecture_and_real_hub_ids_only(tmp_path):
    model = timm.create_model("resnet18", num_classes=3)
    card, meta = _card(casify.wrap(model, layers=["layer4"]), tmp_path)
    hub_id = model.pretrained_cfg["hf_hub_id"]  # e.g. timm/resnet18.a1_in1k: a repo that exists
    assert meta["base_model"] == hub_id and f"https://huggingface.co/{hub_id}" in card
    assert "`resnet18 (timm)`" in card and "`timm/resnet18`" not in card

    cifar = timm.create_model("cifar_resnet18", num_classes=3, width=0.0625)  # no published weights, no hub id
    card, meta = _card(casify.wrap(cifar, layers=["layer4.0"]), tmp_path / "cifar")
    assert "base_model" not in meta and "`cifar_resnet18 (timm)`" in card and "huggingface.co" not in card


def test_card_of_a_trained_model_names_the_method(tmp_path):
    model = _model()
    model.casify_config["training"] = {"config": {"method": "trades", "cas": True, "eps": 8 / 255},
                                       "selected_on": "held-out validation split (robust accuracy)"}
    card, _ = _card(model, tmp_path)
    assert "adversarially fine-tuned" in card and "TRADES+CAS" in card and "not fine-tuned" not in card
    assert "eps = 0.031373 (= 8/255)" in card


def test_card_leads_with_the_worst_case_and_says_whether_checks_ran():
    from casify.io.model_card import make_model_card
    evaluation = {"eps": 8 / 255, "eps_str": "8/255", "n": 10, "accuracy": {"natural": 0.9, "pgd20": 0.5, "worst_case": 0.4},
                  "rows": {"pgd20[cas]": 0.5, "pgd20[cas,straight-through]": 0.45}, "gradient_masking_suspected": None,
                  "upper_bounds": ["pgd20"]}
    card = str(make_model_card({"cas": {"layers": ["layer4"]}}, "user/model", evaluation))
    body = card.split("## Evaluation", 1)[1]
    assert body.index("**worst_case**") < body.index("| natural")
    assert "pgd20[cas,straight-through]" in body and "checks were **not run**" in body
    assert "| pgd20 (upper bound) | 50.00 |" in body
