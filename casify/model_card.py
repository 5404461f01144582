"""The model card a robust model is published with: what it is, how it was trained, and how robust it measured.

Evaluation results go into the Hub's ``model-index`` metadata (one entry per attack), with eps stated in pixel space.
"""
from __future__ import annotations

import json
from typing import List, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

DISTRIBUTION = "casify-robust"  # the name on PyPI (``casify`` there is an unrelated package); import name: casify
PROJECT_URL = f"https://pypi.org/project/{DISTRIBUTION}/"


def base_hub_id(config: dict) -> Optional[str]:
    """The Hub repo of the base model's pretrained config, when one was recorded (timm's ``hf_hub_id``), else None.

    ``timm/resnet18`` and ``torchvision/resnet34`` are not repos, so no id is made up from a name.
    """
    hub_id = (config.get("base_model") or {}).get("hf_hub_id")
    return hub_id if isinstance(hub_id, str) and hub_id.count("/") == 1 else None


def _base_name(config: dict) -> str:
    base = config.get("base_model") or {}
    source, name = base.get("source"), base.get("name")
    if source in ("timm", "torchvision"):
        return f"{name} ({source})"
    return f"{name} (custom architecture)" if name else "a custom architecture"


def _base_line(config: dict) -> str:
    hub_id = base_hub_id(config)
    kwargs = json.dumps((config.get("base_model") or {}).get("kwargs", {}))
    line = f"`{_base_name(config)}`, built with {kwargs}"
    if hub_id:
        line += f"; pretrained config on the Hub: [{hub_id}](https://huggingface.co/{hub_id})"
    return line


def eval_results(evaluation: Optional[dict], dataset_name: str, dataset_type: str, split: str) -> List[EvalResult]:
    """``evaluation`` is ``{"eps": ..., "norm": ..., "accuracy": {attack: fraction}, "n": count}``."""
    if not evaluation:
        return []
    results = []
    eps = evaluation.get("eps_str") or evaluation.get("eps")
    for attack, accuracy in evaluation.get("accuracy", {}).items():
        label = "natural accuracy" if attack == "natural" else f"{attack} accuracy ({evaluation.get('norm', 'linf')}, eps={eps})"
        results.append(EvalResult(task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                                  dataset_split=split, metric_type="accuracy", metric_name=label,
                                  metric_value=round(100 * float(accuracy), 2),
                                  metric_args={"attack": attack, "eps": evaluation.get("eps"),
                                               "norm": evaluation.get("norm", "linf"), "examples": evaluation.get("n")}))
    return results


def make_model_card(config: dict, model_name: str, evaluation: Optional[dict] = None,
                    dataset_name: str = "unknown", dataset_type: str = "unknown", split: str = "test",
                    license: str = "apache-2.0") -> ModelCard:
    """The card for a saved config. Claims only what the config records: a model without a training record is
    described as not fine-tuned by casify, and ``base_model`` metadata is set only for a real Hub repo id."""
    training = config.get("training") or {}
    train_cfg = training.get("config") or {}
    cas = config.get("cas", {})
    data = ModelCardData(model_name=model_name, library_name="casify", license=license, pipeline_tag="image-classification",
                         tags=["adversarial-robustness", "channel-wise-activation-suppressing", "casify", "image-classification"],
                         base_model=base_hub_id(config),
                         eval_results=eval_results(evaluation, dataset_name, dataset_type, split) or None)
    casify_link = f"[casify]({PROJECT_URL})"
    cas_name = "Channel-wise Activation Suppressing (CAS, Bai et al., ICLR 2021)"
    if training:
        method = (train_cfg.get("method") or "unknown").upper() + ("+CAS" if train_cfg.get("cas") else "")
        kind = "A naturally" if train_cfg.get("method") == "standard" else "An adversarially"
        intro = (f"{kind} fine-tuned image classifier: {cas_name} retrofitted by {casify_link} onto "
                 f"`{_base_name(config)}` and fine-tuned with {method}.")
        method_line = f"- **Fine-tuning:** {method} with casify (configuration below)"
    else:
        intro = (f"An image classifier with {cas_name} modules inserted by {casify_link} into `{_base_name(config)}`. "
                 "It was **not fine-tuned by casify** (no training record is stored with it): its weights are those "
                 f"of the wrapped model, and the CAS modules are as initialised (init `{cas.get('init')}`).")
        method_line = "- **Fine-tuning:** none recorded by casify"
    eps = train_cfg.get("eps")
    rows = ""
    if evaluation:
        accuracy = dict(evaluation.get("accuracy", {}))
        # Lead with the worst case: the number a reader should quote.
        ordered = ([("worst_case", accuracy.pop("worst_case"))] if "worst_case" in accuracy else []) + list(accuracy.items())
        bounds = set(evaluation.get("upper_bounds") or [])  # cascade: a family of which only some rows ran on all
        rows = "\n".join(f"| {'**' + a + '**' if a == 'worst_case' else a}{' (upper bound)' if a in bounds else ''} | "
                         f"{100 * float(v):.2f} |" for a, v in ordered)
        attack_rows = evaluation.get("rows") or {}
        detail = ("\n\nEach attack, named by its objective:\n\n| attack | accuracy (%) |\n|---|---|\n"
                  + "\n".join(f"| {a} | {100 * float(v):.2f} |" for a, v in attack_rows.items())) if attack_rows else ""
        suspected = evaluation.get("gradient_masking_suspected", None)
        checks = {True: "**gradient masking suspected** (failed: " + ", ".join(evaluation.get("failed_checks") or []) + ")",
                  False: "the gradient-masking checks passed", None: "the gradient-masking checks were **not run**"}[suspected]
        rows = f"| attack | accuracy (%) |\n|---|---|\n{rows}\n\nOn {evaluation.get('n')} examples of {dataset_name} ({split}), " \
               f"eps = {evaluation.get('eps_str') or evaluation.get('eps')} in pixel space ({evaluation.get('norm', 'linf')}); " \
               f"{checks}. `worst_case` is the per-example worst over every attack; each family row is the per-example " \
               "worst over that family's attacks. CAS models are attacked adaptively (objectives that see the auxiliary " \
               "heads and the routing, best iterate kept, eval mode, each module routing by its own prediction)." + detail
    training_block = (f"```json\n{json.dumps(training, indent=1, default=str)}\n```" if training
                      else "None recorded: casify did not fine-tune this model.")
    content = f"""---
{data.to_yaml()}
---

# {model_name}

{intro}

- **Base model:** {_base_line(config)}
{method_line}
- **CAS layers:** {", ".join(cas.get("layers", [])) or "none"} (init `{cas.get("init")}`, {cas.get("num_classes")} classes)
- **Training threat model:** {"n/a" if eps is None else f"L-inf, eps = {eps:.6f} (= {eps * 255:.3g}/255) in pixel space [0, 1]"}
- **Input normalisation:** {"inside the model: " + json.dumps(config.get("normalize")) if config.get("normalize") else "none"}; feed pixels in [0, 1]
- **Checkpoint selection:** {training.get("selected_on", "n/a")}

## Evaluation

{rows or "No evaluation was recorded."}

## Use

```python
# pip install {DISTRIBUTION}
import casify
model = casify.from_pretrained("{model_name}").eval()   # forward(x) returns logits; x in [0, 1]
```

## Training configuration

{training_block}
"""
    return ModelCard(content)
