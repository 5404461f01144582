"""The model card (huggingface_hub's ModelCard.from_template over casify's own template) and the evaluation summary
it reads (:class:`casify.io.eval_summary.EvalSummary`): every piece of information is there, and malformed input is a
ValueError that names the field. Offline: nothing here touches the network."""
import json
import socket
from importlib import resources
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import casify
from casify.io.eval_summary import EvalSummary
from casify.evaluate.report import AttackResult, Check, EvalReport
from casify.io.model_card import TrainingView, eval_results, make_model_card


class NetworkUsed(BaseException):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"{args} {kwargs}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _row(name, accuracy, kind="white-box", family="", in_worst_case=True, **kw):
    return AttackResult(name=name, kind=kind, accuracy=accuracy, n_correct=None if accuracy is None else 0, n=10,
                        seconds=0.0, eps=8 / 255, family=family or name, in_worst_case=in_worst_case, **kw)


def _report(per_attack=False, suspected=None):
    """A cascade on a CAS model, by hand: pgd20 combines only the row that ran on every example (an upper bound)."""
    attacks = [_row("natural", 0.9, kind="natural"), _row("fgsm[cas]", 0.6, family="fgsm"),
               _row("pgd20[cas]", 0.5, family="pgd20"),
               _row("pgd20[cas,straight-through]", None if not per_attack else 0.45, family="pgd20"),
               _row("gaussian-noise", 0.88, kind="noise")]
    checks = [] if suspected is None else [Check("more_steps_do_not_help", True, "..."),
                                           Check("black_box_not_stronger", not suspected, "...")]
    families = {"natural": {"accuracy": 0.9, "rows": ["natural"]}, "fgsm": {"accuracy": 0.6, "rows": ["fgsm[cas]"]},
                "pgd20": {"accuracy": 0.5, "rows": ["pgd20[cas]"], "upper_bound": True,
                          "survivors_only": ["pgd20[cas,straight-through]"]}}
    cascade = [{"row": "pgd20[cas]", "attacked": 10, "newly_fooled": 5, "robust_after": 5, "every_example": True},
               {"row": "pgd20[cas,straight-through]", "attacked": 5, "newly_fooled": 1, "robust_after": 4,
                "every_example": False}]
    return EvalReport(model={"class": "Net"}, dataset="digits", n_examples=10, eps=8 / 255, eps_str="8/255",
                      norm="linf", suite="quick", seed=0, seeds={}, batch_size=10, device="cpu", world_size=1,
                      natural_accuracy=0.9, attacks=attacks, worst_case={"accuracy": 0.4, "attacks": []}, eps_sweep=[],
                      checks=checks, gradient_masking_suspected=suspected, protocol={}, versions={},
                      elapsed_seconds=1.0, families=families, per_attack=per_attack, cascade=cascade)


# What EvalReport.summary() returned before EvalSummary existed, for _report(): the dict is the interface.
EXPECTED_SUMMARY = {
    "eps": 8 / 255, "eps_str": "8/255", "norm": "linf", "n": 10, "suite": "quick", "mode": "cascade",
    "accuracy": {"natural": 0.9, "fgsm": 0.6, "pgd20": 0.5, "worst_case": 0.4},
    "rows": {"natural": 0.9, "fgsm[cas]": 0.6, "pgd20[cas]": 0.5},
    "families": {"natural": ["natural"], "fgsm": ["fgsm[cas]"], "pgd20": ["pgd20[cas]"]},
    "upper_bounds": ["pgd20"],
    "cascade": [{"row": "pgd20[cas]", "attacked": 10, "newly_fooled": 5, "robust_after": 5, "every_example": True},
                {"row": "pgd20[cas,straight-through]", "attacked": 5, "newly_fooled": 1, "robust_after": 4,
                 "every_example": False}],
    "gradient_masking_suspected": None, "failed_checks": None, "routing_echo_forced": None,
    "nonfinite_logits": {}, "num_classes": None,  # added by issue 29 (NaN / inf logits; chance = 1 / num_classes)
}


def test_summary_is_the_records_dict_exactly():
    report = _report()
    record = report.summary_record()
    assert isinstance(record, EvalSummary)
    assert report.summary() == record.to_dict() == EXPECTED_SUMMARY
    assert list(report.summary()) == list(EXPECTED_SUMMARY)  # the key order of the JSON the CLI prints
    assert EvalSummary.from_dict(json.loads(json.dumps(report.summary()))) == record  # as read back from a config
    checked = _report(suspected=True).summary()
    assert checked["gradient_masking_suspected"] is True and checked["failed_checks"] == ["black_box_not_stronger"]
    d = record.to_dict()
    d["accuracy"]["natural"] = 0.0
    d["cascade"][0]["attacked"] = 0
    assert record.accuracy["natural"] == 0.9 and record.cascade[0]["attacked"] == 10  # to_dict copies


def test_from_dict_reads_a_hand_written_summary_and_ignores_unknown_keys():
    record = EvalSummary.from_dict({"eps": 8 / 255, "accuracy": {"natural": 1, "pgd20": 0.5}, "written_by": "v9"})
    assert record.accuracy == {"natural": 1.0, "pgd20": 0.5} and record.norm == "linf" and record.rows == {}
    assert record.gradient_masking_suspected is None and record.failed_checks is None
    assert set(record.to_dict()) == set(EXPECTED_SUMMARY)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("accuracy"), "evaluation.accuracy is missing"),
    (lambda d: d["accuracy"].update(pgd20="45%"), "evaluation.accuracy.pgd20 = '45%'"),
    (lambda d: d["accuracy"].update(pgd20=45.0), "evaluation.accuracy.pgd20 = 45.0"),
    (lambda d: d["accuracy"].update(pgd20=None), "evaluation.accuracy.pgd20 = None"),
    (lambda d: d.update(accuracy=[0.5]), "evaluation.accuracy = [0.5]"),
    (lambda d: d.update(rows={"pgd20[cas]": True}), "evaluation.rows.pgd20[cas] = True"),
    (lambda d: d.update(families={"pgd20": "pgd20[cas]"}), "evaluation.families.pgd20 = 'pgd20[cas]'"),
    (lambda d: d.update(families={"pgd20": [1]}), "evaluation.families.pgd20[0] = 1"),
    (lambda d: d.update(upper_bounds="pgd20"), "evaluation.upper_bounds = 'pgd20'"),
    (lambda d: d.update(gradient_masking_suspected="no"), "evaluation.gradient_masking_suspected = 'no'"),
    (lambda d: d.update(failed_checks="all"), "evaluation.failed_checks = 'all'"),
    (lambda d: d.update(n=True), "evaluation.n = True"),
    (lambda d: d.update(n=-1), "evaluation.n = -1"),
    (lambda d: d.update(eps="8/255"), "evaluation.eps = '8/255'"),
    (lambda d: d.update(eps_str=8), "evaluation.eps_str = 8"),
    (lambda d: d.update(norm=["linf"]), "evaluation.norm = ['linf']"),
    (lambda d: d.update(mode="fast"), "evaluation.mode = 'fast'"),
    (lambda d: d.update(cascade={"row": "x"}), "evaluation.cascade = "),
    (lambda d: d["cascade"][1].update(attacked="5"), "evaluation.cascade[1].attacked = '5'"),
    (lambda d: d.update(nonfinite_logits={"pgd20": -2}), "evaluation.nonfinite_logits.pgd20 = -2"),
    (lambda d: d.update(nonfinite_logits=[1]), "evaluation.nonfinite_logits = [1]"),
    (lambda d: d.update(num_classes="10"), "evaluation.num_classes = '10'"),
])
def test_a_malformed_summary_is_a_value_error_naming_the_field(edit, field):
    data = json.loads(json.dumps(EXPECTED_SUMMARY))
    edit(data)
    with pytest.raises(ValueError) as info:
        EvalSummary.from_dict(data)
    assert field in str(info.value)
    with pytest.raises(ValueError) as info:  # the card reads it the same way: no KeyError or TypeError inside
        make_model_card({"cas": {"layers": ["block"]}}, "me/model", data)
    assert field in str(info.value)


def test_malformed_metrics_in_a_saved_config_are_named_as_such(tmp_path, tiny_net):
    from casify.core.config_validation import read_config
    model = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None)
    model.save_pretrained(tmp_path, metrics={"accuracy": {"natural": "high"}})  # the config is data: it saves
    config = read_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"metrics.accuracy.natural = 'high' \(str\) is not valid: expected a number "
                                         r"in \[0, 1\]"):
        EvalSummary.from_dict(config["metrics"], "metrics")
    with pytest.raises(ValueError, match="metrics must be a dict"):
        EvalSummary.from_dict([0.5], "metrics")
    with pytest.raises(ValueError, match=r"metrics.accuracy is missing.*val_natural"):  # a trainer's metrics
        EvalSummary.from_dict({"val_natural": 0.9, "val_pgd": 0.4}, "metrics")


def test_write_hub_folder_refuses_a_malformed_evaluation_before_writing(tmp_path, tiny_net):
    model = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None)
    with pytest.raises(ValueError, match="evaluation.accuracy.pgd20"):
        casify.write_hub_folder(model, tmp_path / "out", "me/model", evaluation={"accuracy": {"pgd20": "x"}})
    assert not (tmp_path / "out").exists()
    folder = casify.write_hub_folder(model, tmp_path / "ok", "me/model", evaluation=_report().summary_record())
    assert json.loads((folder / "config.json").read_text())["metrics"] == EXPECTED_SUMMARY
    assert "| **worst_case** | 40.00 |" in (folder / "README.md").read_text()


def test_the_card_is_rendered_from_the_packaged_template(monkeypatch):
    template = resources.files("casify.io").joinpath("templates").joinpath("model_card.md")
    assert template.is_file() and "{{ card_data }}" in template.read_text()
    used = []
    real = ModelCard.from_template.__func__

    def spy(cls, card_data, template_path=None, template_str=None, **kwargs):
        used.append(template_path)
        return real(cls, card_data, template_path=template_path, template_str=template_str, **kwargs)

    monkeypatch.setattr(ModelCard, "from_template", classmethod(spy))
    card = make_model_card({"cas": {"layers": ["block"]}}, "me/model")
    assert isinstance(card, ModelCard) and len(used) == 1 and Path(used[0]).name == "model_card.md"
    assert str(card).startswith("---\n") and str(card).endswith("None recorded: casify did not fine-tune this model.\n")


def test_the_card_carries_every_piece_of_information():
    config = {"base_model": {"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 10},
                             "hf_hub_id": "timm/resnet18.a1_in1k"},
              "cas": {"layers": ["layer4.0", "layer4.1"], "init": "identity", "num_classes": 10},
              "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
              "training": {"config": {"method": "at", "cas": True, "eps": 8 / 255}, "loss": {"method": "at"},
                           "attack": None, "selected_on": "held-out validation split (robust accuracy)", "step": 7,
                           "weights": "EMA (decay 0.999)", "written_by_a_newer_casify": {"x": 1}}}
    evaluation = _report(suspected=True).summary()
    card = str(make_model_card(config, "me/model", evaluation, "CIFAR-10", "cifar10", "test"))
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "casify" and meta["base_model"] == "timm/resnet18.a1_in1k"
    assert meta["pipeline_tag"] == "image-classification" and "adversarial-robustness" in meta["tags"]
    values = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert values == {"natural accuracy": 90.0, "fgsm accuracy (linf, eps=8/255)": 60.0,
                      "pgd20 accuracy (linf, eps=8/255)": 50.0, "worst_case accuracy (linf, eps=8/255)": 40.0}
    assert "An adversarially fine-tuned image classifier" in card and "fine-tuned with AT+CAS." in card
    assert ("- **Base model:** `resnet18 (timm)`, built with {\"num_classes\": 10}; pretrained config on the Hub: "
            "[timm/resnet18.a1_in1k](https://huggingface.co/timm/resnet18.a1_in1k)") in card
    assert "- **Fine-tuning:** AT+CAS with casify (configuration below)" in card
    assert "- **CAS layers:** layer4.0, layer4.1 (init `identity`, 10 classes)" in card
    assert "- **Training threat model:** L-inf, eps = 0.031373 (= 8/255) in pixel space [0, 1]" in card
    assert ('- **Input normalisation:** inside the model: {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}; '
            "feed pixels in [0, 1]") in card
    assert "- **Checkpoint selection:** held-out validation split (robust accuracy)" in card
    body = card.split("## Evaluation", 1)[1].split("## Use", 1)[0]
    assert ("| attack | accuracy (%) |\n|---|---|\n| **worst_case** | 40.00 |\n| natural | 90.00 |\n"
            "| fgsm | 60.00 |\n| pgd20 (upper bound) | 50.00 |\n\nOn 10 examples of CIFAR-10 (test), eps = 8/255 in "
            "pixel space (linf); **gradient masking suspected** (failed: black_box_not_stronger).") in body
    assert ("Each attack, named by its objective:\n\n| attack | accuracy (%) |\n|---|---|\n| natural | 90.00 |\n"
            "| fgsm[cas] | 60.00 |\n| pgd20[cas] | 50.00 |\n\n") in body
    assert 'casify.from_pretrained("me/model")' in card and "pip install casify-robust" in card
    record = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert record == config["training"]  # the whole training record, unknown keys included


def test_checks_passed_and_not_run_are_said():
    passed = str(make_model_card({}, "m", _report(suspected=False).summary()))
    assert "the gradient-masking checks passed." in passed and "failed:" not in passed
    not_run = str(make_model_card({}, "m", _report().summary()))
    assert "the gradient-masking checks were **not run**." in not_run


def test_the_training_record_is_read_defensively():
    from casify.train import TrainingRecord
    record = TrainingRecord(config={"method": "standard", "cas": False, "eps": 0.1}, loss={"method": "ce"},
                            attack=None, selected_on="last step", step=3, weights="trained").to_dict()
    view = TrainingView.from_dict(dict(record, unknown={"a": 1}))
    assert view.method == "STANDARD" and view.natural and view.eps == 0.1 and view.selected_on == "last step"
    assert "A naturally fine-tuned" in str(make_model_card({"training": record}, "m"))
    assert TrainingView.from_dict(None) is None and TrainingView.from_dict({}) is None
    assert TrainingView.from_dict({"config": {"method": "trades"}}).method == "TRADES"
    for training, field in [([1], "training must be a dict"), ({"config": "at"}, "training.config = 'at'"),
                            ({"config": {"eps": "8/255"}}, "training.config.eps = '8/255'"),
                            ({"config": {"eps": 8}}, "training.config.eps = 8"),
                            ({"config": {"method": 1}}, "training.config.method = 1"),
                            ({"config": {"cas": "yes"}}, "training.config.cas = 'yes'"),
                            ({"selected_on": 3}, "training.selected_on = 3"),
                            ({"step": "3"}, "training.step = '3'"), ({"step": True}, "training.step = True"),
                            ({"attack": "pgd"}, "training.attack = 'pgd'"), ({"loss": None}, "training.loss = None")]:
        with pytest.raises(ValueError) as info:
            make_model_card({"training": training}, "m")
        assert field in str(info.value), training


def test_eval_results_accepts_the_record_or_its_dict():
    record = _report().summary_record()
    by_dict = eval_results(record.to_dict(), "d", "d", "test")
    by_record = eval_results(record, "d", "d", "test")
    assert [r.metric_name for r in by_dict] == [r.metric_name for r in by_record] == [
        "natural accuracy", "fgsm accuracy (linf, eps=8/255)", "pgd20 accuracy (linf, eps=8/255)",
        "worst_case accuracy (linf, eps=8/255)"]
    assert by_record[0].metric_args == {"attack": "natural", "eps": 8 / 255, "norm": "linf", "examples": 10}
    assert eval_results(None, "d", "d", "test") == [] == eval_results({}, "d", "d", "test")


def test_the_cards_loading_line_works_and_names_known_datasets(tmp_path, monkeypatch):
    """A card written under a bare name (the demo's) loads with its own from_pretrained line; a known dataset goes
    into the front matter as its Hub id."""
    import re

    import timm
    import torch
    torch.manual_seed(0)
    model = casify.wrap(timm.create_model("mnist_wong_kolter"), ["1"])  # a registered architecture: loads by name
    folder = casify.write_hub_folder(model, tmp_path / "demo", "casify-demo-model", dataset_type="cifar10")
    card = (folder / "README.md").read_text()
    line = re.search(r"model = casify\.from_pretrained\((.+?)\)\.eval\(\)", card)
    assert line and eval(line.group(1)) == str(folder)
    loaded = eval(f"casify.from_pretrained({line.group(1)})")
    assert torch.equal(loaded.state_dict()["0.weight"], model.state_dict()["0.weight"])
    front = card.split("---")[1]
    assert "datasets:\n- uoft-cs/cifar10" in front
    digits = casify.write_hub_folder(model, tmp_path / "digits", "me/model", dataset_type="sklearn-digits")
    text = (digits / "README.md").read_text()
    assert 'casify.from_pretrained("me/model")' in text and "datasets:" not in text.split("---")[1]


def test_a_card_given_only_the_dataset_type_names_the_dataset(tmp_path, tiny_net):
    """The README quickstart passes dataset_type="digits" alone; its card said "examples of unknown"."""
    model = casify.wrap(tiny_net, layers=["block"], input_size=(3, 8, 8), normalize=None)
    evaluation = {"eps": 8 / 255, "n": 200, "accuracy": {"natural": 0.21, "worst_case": 0.1}, "num_classes": 5}
    folder = casify.write_hub_folder(model, tmp_path / "hub", "me/m", evaluation=evaluation, dataset_type="digits")
    card = (folder / "README.md").read_text()
    assert "unknown" not in card and "examples of digits (test)" in card
    # 21 % for 5 classes on 200 images is chance: the card says so
    assert "natural accuracy is at chance for 5 classes" in card
