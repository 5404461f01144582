"""Publishing: every file that would be uploaded is real and checked; only the upload call itself is replaced."""
import shutil
from pathlib import Path

import timm
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

import casify


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


def test_push_uploads_a_loadable_folder_with_a_model_index(tmp_path, monkeypatch):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        _copy_as_uploaded(folder_path, tmp_path / "remote", kwargs)
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


def test_push_with_a_folder_uploads_only_the_model_card_and_reports(tmp_path, monkeypatch):
    """A staging folder that already holds checkpoints, logs and secrets: only the published files leave it."""
    calls = []

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(kwargs)
        return _copy_as_uploaded(folder_path, tmp_path / "remote", kwargs)

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
    from casify.model_card import make_model_card
    evaluation = {"eps": 8 / 255, "eps_str": "8/255", "n": 10, "accuracy": {"natural": 0.9, "pgd20": 0.5, "worst_case": 0.4},
                  "rows": {"pgd20[cas]": 0.5, "pgd20[cas,straight-through]": 0.45}, "gradient_masking_suspected": None,
                  "upper_bounds": ["pgd20"]}
    card = str(make_model_card({"cas": {"layers": ["layer4"]}}, "user/model", evaluation))
    body = card.split("## Evaluation", 1)[1]
    assert body.index("**worst_case**") < body.index("| natural")
    assert "pgd20[cas,straight-through]" in body and "checks were **not run**" in body
    assert "| pgd20 (upper bound) | 50.00 |" in body
