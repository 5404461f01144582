"""The model card a robust model is published with: what it is, how it was trained, and how robust it measured.

The card is ``huggingface_hub.ModelCard.from_template`` over the Jinja template shipped with casify
(``casify/io/templates/model_card.md``): the metadata is a ``ModelCardData`` whose ``eval_results`` become the Hub's
``model-index`` (one entry per attack, eps stated in pixel space); the text is the template filled from the config.
What the card reads is checked first: the evaluation through :meth:`casify.io.eval_summary.EvalSummary.from_dict`, the
training record (``casify.train.TrainingRecord``, stored as the config's ``training``) field by field, so a malformed
one is a ValueError naming the field, not an error deep in the template.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import List, Mapping, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .eval_summary import EvalSummary

DISTRIBUTION = "casify-robust"  # the name on PyPI (``casify`` there is an unrelated package); import name: casify
PROJECT_URL = f"https://pypi.org/project/{DISTRIBUTION}/"
TEMPLATE = "model_card.md"  # in casify/io/templates/
CAS_NAME = "Channel-wise Activation Suppressing (CAS, Bai et al., ICLR 2021)"
TAGS = ["adversarial-robustness", "channel-wise-activation-suppressing", "casify", "image-classification"]


def base_hub_id(config: dict) -> Optional[str]:
    """The Hub repo of the base model's pretrained config, when one was recorded (timm's ``hf_hub_id``), else None.

    ``timm/resnet18`` and ``torchvision/resnet34`` are not repos, so no id is made up from a name.
    """
    hub_id = (config.get("base_model") or {}).get("hf_hub_id")
    return hub_id if isinstance(hub_id, str) and hub_id.count("/") == 1 else None


HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "svhn": "ufldl-stanford/svhn",
                "mnist": "ylecun/mnist"}
"""casify's dataset names -> the Hub dataset repos they are published as, for the card's ``datasets:`` metadata."""


def hub_dataset_id(dataset_type: str) -> Optional[str]:
    """The Hub dataset repo of one of casify's dataset names, else None (no id is made up for other data)."""
    return HUB_DATASETS.get(str(dataset_type).lower())


def load_name(model_name: str, folder: Optional[str]) -> str:
    """What the card's ``from_pretrained`` line names: the Hub repo when ``model_name`` is one (``user/name``), else
    the folder the card was written into (a bare name like ``my-model`` is neither a folder nor a repo)."""
    if model_name.count("/") == 1 and not model_name.startswith((".", "/")):
        return model_name
    return folder if folder is not None else model_name


def _base_name(config: dict) -> str:
    base = config.get("base_model") or {}
    source, name = base.get("source"), base.get("name")
    if source in ("timm", "torchvision"):
        return f"{name} ({source})"
    return f"{name} (custom architecture)" if name else "a custom architecture"


@dataclass(frozen=True)
class TrainingView:
    """What the card reads from a config's ``training`` (a ``casify.train.TrainingRecord`` as a dict): the method,
    whether CAS was trained, the training eps and how the checkpoint was selected, plus the whole record as JSON."""
    method: str
    natural: bool
    eps: Optional[float]
    selected_on: Optional[str]
    record_json: str
    attack: Optional[str] = None  # the training attack, in words (recorded by runs since train.attack)
    overfitting: Optional[str] = None  # the catastrophic-overfitting guard's record, in words, when it fired

    @classmethod
    def from_dict(cls, training, source: str = "training") -> Optional["TrainingView"]:
        """None for no record (None or empty). Unknown keys are ignored (shown in the JSON only); a known key of the
        wrong type raises ValueError naming it (``training.config.eps``). Every key may be missing: a record written
        by hand may hold only ``config``."""
        if training is None or training == {}:
            return None
        if not isinstance(training, dict):
            raise ValueError(f"{source} must be a dict (a casify.train.TrainingRecord), got {type(training).__name__}")

        def fail(name, value, expected):
            raise ValueError(f"{source}.{name} = {value!r} ({type(value).__name__}) is not valid: expected {expected}")

        for key, types, expected in (("config", (dict,), "a dict"), ("loss", (dict,), "a dict"),
                                     ("attack", (dict, type(None)), "a dict or null"),
                                     ("selected_on", (str,), "a string"), ("weights", (str,), "a string"),
                                     ("step", (int,), "an integer")):
            if key in training and (not isinstance(training[key], types) or isinstance(training[key], bool)):
                fail(key, training[key], expected)
        config = training.get("config") or {}
        method = config.get("method")
        if method is not None and not isinstance(method, str):
            fail("config.method", method, "a string (at, trades, mart, standard, ...)")
        cas = config.get("cas", False)
        if not isinstance(cas, bool):
            fail("config.cas", cas, "true or false")
        eps = config.get("eps")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                                or not 0 <= eps <= 1):
            fail("config.eps", eps, "a number in [0, 1] (pixel units) or null")
        overfitting = training.get("overfitting")
        if overfitting is not None and not isinstance(overfitting, dict):
            fail("overfitting", overfitting, "a dict (the guard's record) or null")
        return cls(method=(method or "unknown").upper() + ("+CAS" if cas else ""), natural=method == "standard",
                   eps=None if eps is None else float(eps), selected_on=training.get("selected_on"),
                   record_json=json.dumps(training, indent=1, default=str),
                   attack=_attack_words(training.get("attack")), overfitting=_overfitting_words(overfitting))


ATTACK_NAMES = {"pgd": "PGD", "fgsm": "FGSM (no random start)",
                "fgsm_rs": "FGSM with a random start (FGSM-RS, Wong et al. 2020)",
                "n_fgsm": "N-FGSM (de Jorge et al. 2022: noise of {noise:g} eps, no projection to the eps-ball)"}


def _attack_words(attack) -> Optional[str]:
    """The training attack of a record, in words (None when the record has none or it is malformed: the JSON below
    the card still shows it)."""
    if not isinstance(attack, dict) or not isinstance(attack.get("kind"), str):
        return None
    kind = attack["kind"]
    name = ATTACK_NAMES.get(kind, kind).format(noise=(attack.get("options") or {}).get("noise", 2.0))
    steps, alpha = attack.get("steps"), attack.get("alpha")
    budget = (f"{steps} step{'s' if steps != 1 else ''}" if isinstance(steps, int) else "")
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        budget += f" of {alpha * 255:.3g}/255"
    return f"{name}, {budget}" if budget else name


def _overfitting_words(record: Optional[dict]) -> Optional[str]:
    if not record:
        return None
    def pct(key):
        value = record.get(key)
        return f"{100 * value:.1f} %" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"
    condition = record.get("condition")  # which condition held, in the guard's words (absent before it had two)
    condition = f", {condition}" if isinstance(condition, str) else ""
    return (f"detected at step {record.get('step')}{condition} (held-out PGD accuracy {pct('val_pgd')}, best "
            f"{pct('best_pgd')} at step {record.get('best_pgd_step')}; FGSM accuracy {pct('val_fgsm')}). "
            f"{record.get('selection', '')}")


def _summary(evaluation: Union[None, dict, EvalSummary]) -> Optional[EvalSummary]:
    if isinstance(evaluation, EvalSummary):
        return evaluation
    return EvalSummary.from_dict(evaluation, "evaluation") if evaluation else None


def eval_results(evaluation: Union[None, dict, EvalSummary], dataset_name: str, dataset_type: str,
                 split: str) -> List[EvalResult]:
    """The ``model-index`` entries: one per ``accuracy`` entry of an :class:`EvalSummary` (or its dict, checked)."""
    summary = _summary(evaluation)
    if summary is None:
        return []
    eps = summary.eps_str or summary.eps
    return [EvalResult(task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                       dataset_split=split, metric_type="accuracy",
                       metric_name="natural accuracy" if attack == "natural"
                       else f"{attack} accuracy ({summary.norm}, eps={eps})",
                       metric_value=round(100 * float(accuracy), 2),
                       metric_args={"attack": attack, "eps": summary.eps, "norm": summary.norm, "examples": summary.n})
            for attack, accuracy in summary.accuracy.items()]


def make_model_card(config: dict, model_name: str, evaluation: Union[None, dict, EvalSummary] = None,
                    dataset_name: str = "unknown", dataset_type: str = "unknown", split: str = "test",
                    license: str = "apache-2.0", figures: Optional[Mapping[str, str]] = None,
                    folder: Optional[str] = None) -> ModelCard:
    """The card for a saved config. Claims only what the config records: a model without a training record is
    described as not fine-tuned by casify, and ``base_model`` metadata is set only for a real Hub repo id.

    ``evaluation``: an ``EvalReport.summary()`` (or its :class:`EvalSummary`); a malformed one, like a malformed
    ``training`` in the config, raises ValueError naming the field. ``figures``: figure kind (``robustness_curve``,
    ``attacks``) -> file name beside the card, shown under the evaluation. ``folder``: where the card is written,
    named by its loading line when ``model_name`` is not a Hub repo id. ``dataset_name`` defaults to
    ``dataset_type`` when only that is given."""
    summary = _summary(evaluation)
    if dataset_name in (None, "", "unknown") and dataset_type not in (None, "", "unknown"):
        dataset_name = dataset_type  # write_hub_folder(..., dataset_type="digits") names the data too
    training = TrainingView.from_dict(config.get("training"))
    cas = config.get("cas") or {}
    data = ModelCardData(model_name=model_name, library_name="casify", license=license, pipeline_tag="image-classification",
                         tags=list(TAGS), base_model=base_hub_id(config),
                         datasets=[hub_dataset_id(dataset_type)] if hub_dataset_id(dataset_type) else None,
                         eval_results=eval_results(summary, dataset_name, dataset_type, split) or None)
    headline = []
    if summary is not None:  # lead with the worst case: the number a reader should quote
        accuracy = dict(summary.accuracy)
        headline = ([("worst_case", accuracy.pop("worst_case"))] if "worst_case" in accuracy else []) \
            + list(accuracy.items())
    template = resources.files("casify.io").joinpath("templates").joinpath(TEMPLATE)
    with resources.as_file(template) as path:
        return ModelCard.from_template(
            data, template_path=str(path), model_name=model_name, cas_name=CAS_NAME,
            casify_link=f"[casify]({PROJECT_URL})", distribution=DISTRIBUTION,
            load_name=load_name(model_name, folder),
            base={"name": _base_name(config), "hub_id": base_hub_id(config),
                  "weights": (config.get("base_model") or {}).get("pretrained_weights"),
                  "kwargs_json": json.dumps((config.get("base_model") or {}).get("kwargs", {}))},
            cas={"layers": list(cas.get("layers") or []), "init": cas.get("init"),
                 "num_classes": cas.get("num_classes")},
            normalize_json=json.dumps(config["normalize"]) if config.get("normalize") else None,
            training=training, evaluation=summary, headline=headline, dataset_name=dataset_name, split=split,
            figures=[{"caption": kind.replace("_", " "), "file": name} for kind, name in (figures or {}).items()])
