"""Cost against the anchors, as ratios measured in one run, interleaved, medians of repeats (issue 5, part 3).

1. AT+CAS step vs AT step on the same backbone (the CAS overhead; its limit is about 1.00);
2. casify's fx-wrapped model vs a hand-written CAS model of the same architecture (forward + backward: surgery overhead);
3. casify's PGD vs torchattacks' PGD on the same model (attack throughput);
4. peak memory of each pair (CUDA: max allocated; CPU: the peak of torch's live CPU allocations traced with
   torch.profiler, which is exact and repeatable, and the sampled peak RSS growth, median over fresh subprocesses).

    python benchmarks/cost_ratios.py --out benchmarks/results/cost_ratios.json [--device cuda] [--width 0.5]
    python benchmarks/cost_ratios.py --threads 1 --parts pgd   # only the PGD pair; other parts kept from --out

casify's PGD is timed and measured twice: with its default ``keep="best"`` (best-iterate tracking: one more buffer of
the batch's size than a last-iterate attack) and with ``keep="last"`` (what torchattacks returns).
On CPU, RSS depends on glibc's heap (trimming, mmap thresholds) more than on what the attack allocates: repeated runs
of the same variant differ by tens of MB, so the traced peak is the ratio to read there.

torchattacks is a benchmark-only tool (`pip install --no-deps torchattacks`: its requests pin conflicts with
huggingface_hub); it is not a casify dependency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

import casify
from casify import attacks
from casify.defenses import CASModule
from casify.losses import get_loss


class HandWrittenCASResNet(nn.Module):
    """The reference: a CIFAR ResNet-18 with CAS written into its forward by hand (what the authors' code does)."""

    def __init__(self, base: nn.Module, cas0: CASModule, cas1: CASModule):
        super().__init__()
        self.base, self.cas0, self.cas1 = base, cas0, cas1

    def forward(self, x):
        b = self.base
        x = b.relu(b.bn1(b.conv1(x)))
        x = b.layer3(b.layer2(b.layer1(x)))
        x = self.cas1(b.layer4[1](self.cas0(b.layer4[0](x))))
        return b.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(kind: str, width: float, device: str, seed: int = 0):
    torch.manual_seed(seed)
    base = timm.create_model("cifar_resnet18", num_classes=10, width=width).to(device)
    if kind == "plain":
        return casify.wrap(base, [], input_size=(3, 32, 32))
    wrapped = casify.wrap(base, ["layer4.0", "layer4.1"], input_size=(3, 32, 32), init="paper")
    if kind == "fx":
        return wrapped
    mods = list(wrapped.cas_modules.values())
    return HandWrittenCASResNet(casify.unwrap(wrapped), mods[0], mods[1]).to(device)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_train_step(model, x, y, cas: bool, device: str, steps: int = 10) -> float:
    loss_fn = get_loss("at", cas=cas)
    attack = loss_fn.training_attack(steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sync(device)
    t = time.perf_counter()
    x_adv = attack(model, x, y)
    model.train()
    loss, _ = loss_fn(model, x, x_adv, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    _sync(device)
    return time.perf_counter() - t


def time_fwd_bwd(model, x, y, device: str) -> float:
    model.train()
    _sync(device)
    t = time.perf_counter()
    with casify.route(model, labels=y):
        loss = F.cross_entropy(model(x), y) + sum(F.cross_entropy(a, y) for a in casify.aux_logits(model))
    loss.backward()
    _sync(device)
    return time.perf_counter() - t


BASELINE = {}  # --baseline-attacks: another copy of casify/attacks.py (e.g. before a change), timed alongside


def load_baseline(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("casify._baseline_attacks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    BASELINE["attacks"] = module


def time_pgd(kind: str, model, x, y, device: str, steps: int = 10) -> float:
    model.eval()
    _sync(device)
    t = time.perf_counter()
    if kind.startswith("casify"):  # casify, casify-last, casify-baseline, casify-baseline-last
        module = BASELINE["attacks"] if "baseline" in kind else attacks
        module.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=steps, objective="ce",
                   keep="last" if kind.endswith("-last") else "best")
    else:
        import torchattacks
        torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)(x, y)
    _sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Run each variant in turn, ``repeats`` rounds, after warm-up; return median seconds per variant."""
    samples = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(fn())
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": len(v)}
            for k, v in samples.items()}


MEMORY_VARIANTS = {"cas": ("at", "at_cas"), "surgery": ("hand", "fx"),
                   "pgd": ("pgd_torchattacks", "pgd_casify", "pgd_casify-last")}


def traced_peak(fn) -> Optional[int]:
    """Peak of torch's live CPU allocations while ``fn`` runs, above what was live before (torch.profiler's memory
    events, replayed in time order): exact and repeatable, unlike RSS. None if this torch does not expose them."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory_child(args) -> Optional[int]:
    """Run one variant in this (fresh) process and return its peak memory growth in bytes."""
    device = args.device
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variant = args.memory_child
    model = build("plain" if variant.startswith("pgd_") else {"at": "plain", "at_cas": "fx", "fx": "fx",
                                                               "hand": "hand"}[variant], args.width, device)
    def run():
        if variant in ("at", "at_cas"):
            time_train_step(model, x, y, variant == "at_cas", device)
        elif variant in ("fx", "hand"):
            time_fwd_bwd(model, x, y, device)
        else:
            time_pgd(variant.split("_", 1)[1], model, x, y, device)

    run()  # warm-up: allocator caches and lazy initialisation are not part of the variant's peak
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    import gc
    gc.collect()
    if args.memory_method == "traced":
        return traced_peak(run)
    import threading

    import psutil
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():  # torch ops release the GIL, so a sampling thread sees the RSS while they run
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    run()
    done.set()
    thread.join()
    return peak[0] - base


def measure_memory(args, variants, method: str, repeats: int) -> dict:
    """Per variant, the median over ``repeats`` fresh subprocesses (the variants interleaved round by round)."""
    samples = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            cmd = [sys.executable, __file__, "--memory-child", variant, "--memory-method", method, "--device",
                   args.device, "--width", str(args.width), "--batch", str(args.batch)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--baseline-attacks", args.baseline_attacks] if args.baseline_attacks else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            value = out.stdout.strip().splitlines()[-1]
            samples[variant].append(None if value == "None" else int(value))
    return {v: (None if None in s else {"median": int(statistics.median(s)), "min": min(s), "max": max(s),
                                        "n": len(s)}) for v, s in samples.items()}


def _ratio(num, den):
    return None if num is None or den is None else num / max(1, den)


PARTS = ("cas", "surgery", "pgd")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cost_ratios.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=0.5, help="CIFAR ResNet-18 width (1.0 = the paper's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh subprocesses per variant (RSS median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {PARTS}; the other parts are kept from --out if it exists")
    parser.add_argument("--baseline-attacks", default=None,
                        help="path to another copy of casify/attacks.py (e.g. before a change): its PGD is timed and "
                             "measured in the same run as 'casify-baseline' (keep='best') and 'casify-baseline-last'")
    parser.add_argument("--note", default=None, help="free text stored with the parts run (e.g. machine load)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-method", default="rss", choices=("rss", "traced"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline_attacks:
        load_baseline(args.baseline_attacks)
    if args.memory_child:
        print(peak_memory_child(args))
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    device = args.device
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    plain = build("plain", args.width, device)
    payload = {k: previous[k] for k in ("fx_vs_hand_max_abs_output_diff",) if k in previous}
    results = dict(previous.get("timings", {}))
    ratios = dict(previous.get("ratios", {}))
    if "surgery" in parts:
        fx, hand = build("fx", args.width, device), build("hand", args.width, device)
        # the hand-written model computes exactly what the fx-wrapped one does (same weights)
        fx.eval(), hand.eval()
        hand.load_state_dict({k.replace("cas_modules.layer4_0", "cas0").replace("cas_modules.layer4_1", "cas1")
                              if k.startswith("cas_modules") else f"base.{k}": v for k, v in fx.state_dict().items()})
        with torch.no_grad():
            payload["fx_vs_hand_max_abs_output_diff"] = (fx(x) - hand(x)).abs().max().item()
        results["surgery_overhead"] = interleaved({"hand": lambda: time_fwd_bwd(hand, x, y, device),
                                                   "fx": lambda: time_fwd_bwd(fx, x, y, device)}, args.repeats * 3)
        ratios["fx_over_hand_written_fwd_bwd"] = (results["surgery_overhead"]["fx"]["median_s"]
                                                  / results["surgery_overhead"]["hand"]["median_s"])
    if "cas" in parts:
        fx_cas = build("fx", args.width, device)
        results["cas_overhead"] = interleaved({"at": lambda: time_train_step(plain, x, y, False, device),
                                               "at_cas": lambda: time_train_step(fx_cas, x, y, True, device)},
                                              args.repeats)
        ratios["at_cas_step_over_at_step"] = (results["cas_overhead"]["at_cas"]["median_s"]
                                              / results["cas_overhead"]["at"]["median_s"])
    pgd_kinds = ["torchattacks", "casify", "casify-last"]
    if args.baseline_attacks:
        pgd_kinds += ["casify-baseline", "casify-baseline-last"]
    if "pgd" in parts:
        # the variants alternate within every round, so a background load hits them alike
        results["attack_throughput"] = interleaved(
            {k.replace("-", "_"): (lambda k=k: time_pgd(k, plain, x, y, device)) for k in pgd_kinds}, args.repeats)
        att = results["attack_throughput"]
        for k in pgd_kinds[1:]:
            name = {"casify": "casify_pgd_over_torchattacks_pgd_time"}.get(
                k, f"{k.replace('-', '_')}_pgd_over_torchattacks_pgd_time")
            ratios[name] = att[k.replace("-", "_")]["median_s"] / att["torchattacks"]["median_s"]
    variants = [v for p in parts for v in MEMORY_VARIANTS[p]]
    if "pgd" in parts and args.baseline_attacks:
        variants += ["pgd_casify-baseline", "pgd_casify-baseline-last"]
    methods = ["cuda_max_allocated"] if device.startswith("cuda") else ["rss", "traced"]
    if "peak_memory" not in previous and "peak_memory_bytes" in previous:  # the format before parts: RSS only
        previous["peak_memory"] = {"rss": dict(previous["peak_memory_bytes"])}
    memory = {m: dict(previous.get("peak_memory", {}).get(m, {})) for m in methods}
    for method in methods:
        repeats = 1 if method == "traced" else args.memory_repeats  # traced: deterministic
        memory[method].update(measure_memory(args, variants, "rss" if method == "cuda_max_allocated" else method,
                                             repeats))
    pairs = {"at_cas_over_at": ("at_cas", "at"), "fx_over_hand": ("fx", "hand"),
             "casify_pgd_over_torchattacks": ("pgd_casify", "pgd_torchattacks"),
             "casify_pgd_keep_last_over_torchattacks": ("pgd_casify-last", "pgd_torchattacks"),
             "casify_baseline_pgd_over_torchattacks": ("pgd_casify-baseline", "pgd_torchattacks"),
             "casify_baseline_pgd_keep_last_over_torchattacks": ("pgd_casify-baseline-last", "pgd_torchattacks")}

    def median(method, variant):
        entry = memory[method].get(variant)
        return entry["median"] if isinstance(entry, dict) else entry

    memory_ratios = {m: {name: _ratio(median(m, a), median(m, b)) for name, (a, b) in pairs.items()
                         if a in memory[m] and b in memory[m]} for m in methods}
    runs = dict(previous.get("runs", {}))
    for p in parts:
        runs[p] = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "repeats": args.repeats,
                   "memory_repeats": args.memory_repeats, "note": args.note}
    payload.update({
        "benchmark": "cost_ratios", "device": device, "machine": platform.machine(),
        "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "width": args.width, "batch": args.batch, "repeats": args.repeats,
        "attack_steps": 10, "attack": "L-inf PGD, eps 8/255, alpha 2/255, 10 steps, uniform random start, CE",
        "seed": 0, "versions": {"torch": torch.__version__, "casify": casify.__version__},
        "runs": runs, "timings": results, "ratios": ratios, "peak_memory": memory,
        "peak_memory_ratios": memory_ratios,
        "memory_methods": {
            "cuda_max_allocated": "torch.cuda.max_memory_allocated above the pre-run allocation, after one warm-up",
            "rss": "peak RSS above the pre-run RSS, sampled every 0.5 ms, after one warm-up run, in a fresh "
                   "subprocess per variant and repeat; median over repeats (noisy on CPU: glibc heap behaviour)",
            "traced": "peak of torch's live CPU allocations above the pre-run level (torch.profiler memory events, "
                      "replayed in time order), after one warm-up run, in a fresh subprocess; deterministic"},
    })
    # the parts' numbers before this run, for reference (one level: the run before)
    payload["previous"] = dict(previous.get("previous", {}))
    part_keys = {"cas": ("cas_overhead", ("at_cas_step_over_at_step",), ("at_cas_over_at",)),
                 "surgery": ("surgery_overhead", ("fx_over_hand_written_fwd_bwd",), ("fx_over_hand",)),
                 "pgd": ("attack_throughput", [k for k in previous.get("ratios", {}) if "pgd" in k],
                         ("casify_pgd_over_torchattacks", "casify_pgd_keep_last_over_torchattacks"))}
    for p in parts:
        if not previous:
            break
        timing_key, ratio_keys, memory_keys = part_keys[p]
        old_memory_ratios = previous.get("peak_memory_ratios", {})
        if old_memory_ratios and not isinstance(next(iter(old_memory_ratios.values())), dict):
            old_memory_ratios = {"rss": old_memory_ratios}  # the format before parts
        payload["previous"][p] = {
            "run": previous.get("runs", {}).get(p, {"threads": previous.get("threads"),
                                                    "repeats": previous.get("repeats")}),
            "timings": previous.get("timings", {}).get(timing_key),
            "ratios": {k: previous.get("ratios", {}).get(k) for k in ratio_keys},
            "peak_memory_ratios": {m: {k: v for k, v in r.items() if k in memory_keys}
                                   for m, r in old_memory_ratios.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps({"ratios": ratios, "peak_memory_ratios": memory_ratios}, indent=1))


if __name__ == "__main__":
    main()
