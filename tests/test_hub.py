"""Publishing: every file that would be uploaded is real and checked; only the upload call itself is replaced."""
import shutil
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi

import casify


def _model():
    from conftest import TinyNet
    torch.manual_seed(0)
    return casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None)


EVAL = {"eps": 8 / 255, "eps_str": "8/255", "norm": "linf", "n": 100,
        "accuracy": {"natural": 0.9, "fgsm": 0.6, "pgd20": 0.45, "cw20": 0.44}}


def test_push_uploads_a_loadable_folder_with_a_model_index(tmp_path, monkeypatch):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        shutil.copytree(folder_path, tmp_path / "remote")
        return "commit"

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

    # from_pretrained("user/repo") goes through hf_hub_download; serve the uploaded files from the fake remote
    import huggingface_hub

    def fake_download(repo_id, filename, **kwargs):
        assert repo_id == "someone/tiny-cas"
        return str(remote / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from conftest import TinyNet
    loaded = casify.from_pretrained("someone/tiny-cas", model=TinyNet())
    model.eval(), loaded.eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_write_hub_folder_without_evaluation(tmp_path):
    folder = casify.write_hub_folder(_model(), tmp_path / "out", "me/model")
    card = (Path(folder) / "README.md").read_text()
    assert "No evaluation was recorded" in card and "model-index" not in card
