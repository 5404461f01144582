"""Zoo sweep: wrap every torchvision classification model and one model of every timm family with ``layers="auto"``.

For each model: forward + backward in training mode under label routing, a check that every original state-dict key is
kept (and only ``cas_modules.*`` keys are added), and a check that the identity initialisation preserves the eval-mode
output. Models are created with ``pretrained=False`` (nothing is downloaded). Writes JSON and a markdown summary.

    python benchmarks/zoo_sweep.py --out benchmarks/results/zoo_sweep.json [--limit N] [--only torchvision|timm]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import signal
import time
import traceback
import warnings
from pathlib import Path

import torch

import casify

SMALL_FAMILY_HINT = re.compile(r"(atto|femto|pico|nano|micro|tiny|small|mini|_xs|_s\b|_t\b|b0|050|_18|18\b|_11|lite0)")


def timm_families():
    """One model per timm family (module), preferring a small variant."""
    import timm
    picks = {}
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue
        small = [n for n in names if SMALL_FAMILY_HINT.search(n)]
        picks[module] = sorted(small or names, key=len)[0]
    return picks


def build(source, name, num_classes=10):
    if source == "timm":
        import timm
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import torchvision.models as tvm
    kwargs = {"num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=True, init_weights=False)
    return tvm.get_model(name, weights=None, **kwargs)


def input_sizes(model, name):
    cfg = getattr(model, "pretrained_cfg", None) or {}
    natural = tuple(cfg.get("input_size", (3, 299 if name == "inception_v3" else 224, 224)))
    if name == "inception_v3":
        natural = (3, 299, 299)
    small = (natural[0], 64, 64)
    return [small, natural] if small != natural else [natural]


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("timed out")


def check(source, name, timeout):
    t0 = time.time()
    record = {"source": source, "model": name}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        model = build(source, name)
        record["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        errors = []
        for size in input_sizes(model, name):
            try:
                wrapped = casify.wrap(model, "auto", normalize=None, input_size=size)
                break
            except Exception as exc:  # try the model's natural input size next
                errors.append(f"{size}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        else:
            raise RuntimeError(" | ".join(errors))
        record["input_size"] = list(size)
        record["layers"] = wrapped.cas_layers
        record["channels"] = wrapped.casify_config["cas"]["channels"]
        original, new = set(model.state_dict()), set(wrapped.state_dict())
        record["keys_kept"] = original <= new and all(k.startswith("cas_modules.") for k in new - original)
        x = torch.rand(2, *size)
        model.eval(), wrapped.eval()
        with torch.no_grad():
            ref, out = model(x), wrapped(x)
        record["identity_preserved"] = bool(torch.allclose(ref, out, atol=1e-5, rtol=1e-4))
        wrapped.train()
        with casify.route(wrapped, torch.tensor([1, 7])):
            out = wrapped(x)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        loss = logits.float().logsumexp(1).mean() + sum(a.float().logsumexp(1).mean() for a in wrapped.cas_outputs.values())
        loss.backward()
        cas_grads = [m.classifier.weight.grad for m in wrapped.cas_modules.values()]
        record["backward_ok"] = all(g is not None and torch.isfinite(g).all().item() for g in cas_grads)
        record["ok"] = record["keys_kept"] and record["backward_ok"] and record["identity_preserved"]
        if not record["ok"]:
            record["reason"] = ", ".join(k for k in ("keys_kept", "backward_ok", "identity_preserved") if not record[k])
    except BaseException as exc:  # record every failure with its reason and go on
        if isinstance(exc, KeyboardInterrupt):
            raise
        record["ok"] = False
        record["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
        record["where"] = traceback.format_exc().strip().splitlines()[-3:-1]
    finally:
        signal.alarm(0)
        gc.collect()
    record["seconds"] = round(time.time() - t0, 2)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/zoo_sweep.json")
    parser.add_argument("--only", choices=["torchvision", "timm"], default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N models of each source (for a quick run)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import timm
    import torchvision
    import torchvision.models as tvm

    jobs = []
    if args.only in (None, "torchvision"):
        jobs += [("torchvision", n, n) for n in tvm.list_models(module=tvm)][: args.limit]
    if args.only in (None, "timm"):
        jobs += [("timm", n, fam) for fam, n in timm_families().items()][: args.limit]
    results = []
    for source, name, family in jobs:
        record = check(source, name, args.timeout)
        record["family"] = family
        results.append(record)
        status = "ok" if record["ok"] else f"FAIL ({record.get('reason')})"
        print(f"{source:11s} {name:40s} {record['seconds']:6.1f}s {status}", flush=True)
    summary = {}
    for source in ("torchvision", "timm"):
        rs = [r for r in results if r["source"] == source]
        if rs:
            ok = sum(r["ok"] for r in rs)
            summary[source] = {"models": len(rs), "ok": ok, "rate": round(ok / len(rs), 4),
                               "failures": {r["model"]: r.get("reason") for r in rs if not r["ok"]}}
    payload = {"benchmark": "zoo_sweep", "versions": {"casify": casify.__version__, "torch": torch.__version__,
               "torchvision": torchvision.__version__, "timm": timm.__version__, "python": platform.python_version()},
               "machine": platform.machine(), "summary": summary, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["# Zoo sweep", "", "`python benchmarks/zoo_sweep.py` — wrap with `layers=\"auto\"`, forward + backward under "
             "label routing, state-dict keys kept, identity init preserves the output.", ""]
    for source, s in summary.items():
        lines.append(f"- **{source}**: {s['ok']}/{s['models']} ({100 * s['rate']:.1f} %)")
    lines += ["", "| source | model | family | layer | input | ok | reason |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['source']} | {r['model']} | {r['family']} | {', '.join(r.get('layers', []))} | "
                     f"{'x'.join(map(str, r.get('input_size', [])[1:]))} | {'yes' if r['ok'] else 'no'} | "
                     f"{(r.get('reason') or '').replace('|', '/')[:160]} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
