"""The model card a robust model is published with: what it is, how it was trained, and how robust it measured.

Evaluation results go into the Hub's ``model-index`` metadata (one entry per attack), with eps stated in pixel space.
"""
from __future__ import annotations

import json
from typing import List, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData


def _base_name(config: dict) -> str:
    base = config.get("base_model") or {}
    source, name = base.get("source"), base.get("name")
    if source == "timm":
        return f"timm/{name}"
    if source == "torchvision":
        return f"torchvision/{name}"
    return name or "custom"


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
    training = config.get("training") or {}
    train_cfg = training.get("config", {})
    cas = config.get("cas", {})
    method = (train_cfg.get("method") or "none").upper() + ("+CAS" if train_cfg.get("cas") else "")
    data = ModelCardData(model_name=model_name, library_name="casify", license=license, pipeline_tag="image-classification",
                         tags=["adversarial-robustness", "channel-wise-activation-suppressing", "casify", "image-classification"],
                         eval_results=eval_results(evaluation, dataset_name, dataset_type, split) or None)
    eps = train_cfg.get("eps")
    rows = ""
    if evaluation:
        rows = "\n".join(f"| {a} | {100 * float(v):.2f} |" for a, v in evaluation.get("accuracy", {}).items())
        rows = f"| attack | accuracy (%) |\n|---|---|\n{rows}\n\nOn {evaluation.get('n')} examples of {dataset_name} ({split}), " \
               f"eps = {evaluation.get('eps_str') or evaluation.get('eps')} in pixel space ({evaluation.get('norm', 'linf')}). " \
               "CAS models are attacked adaptively (the joint CE + beta * mean auxiliary CE objective, eval mode, each module " \
               "routing by its own prediction)."
    content = f"""---
{data.to_yaml()}
---

# {model_name}

An adversarially fine-tuned image classifier made with [casify](https://pypi.org/project/casify/): Channel-wise
Activation Suppressing (CAS, Bai et al., ICLR 2021) retrofitted onto `{_base_name(config)}`.

- **Base model:** `{_base_name(config)}` ({json.dumps((config.get("base_model") or {}).get("kwargs", {}))})
- **Method:** {method}
- **CAS layers:** {", ".join(cas.get("layers", [])) or "none"} (init `{cas.get("init")}`, {cas.get("num_classes")} classes)
- **Threat model:** L-inf, eps = {eps if eps is None else f"{eps:.6f} (= {eps * 255:.3g}/255)"} in pixel space [0, 1]
- **Input normalisation:** {"inside the model: " + json.dumps(config.get("normalize")) if config.get("normalize") else "none"}; feed pixels in [0, 1]
- **Checkpoint selection:** {training.get("selected_on", "n/a")}

## Evaluation

{rows or "No evaluation was recorded."}

## Use

```python
import casify
model = casify.from_pretrained("{model_name}").eval()   # forward(x) returns logits; x in [0, 1]
```

## Training configuration

```json
{json.dumps(training, indent=1, default=str)}
```
"""
    return ModelCard(content)
