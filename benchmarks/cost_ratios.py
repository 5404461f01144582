"""Cost against the anchors, as ratios measured in one run, interleaved, medians of repeats (issue 5, part 3).

1. AT+CAS step vs AT step on the same backbone (the CAS overhead; its limit is about 1.00);
2. casify's fx-wrapped model vs a hand-written CAS model of the same architecture (forward + backward: surgery overhead);
3. casify's PGD vs torchattacks' PGD on the same model (attack throughput);
4. peak memory of each pair (CUDA: max allocated; CPU: sampled peak RSS growth in a fresh subprocess per variant).

    python benchmarks/cost_ratios.py --out benchmarks/results/cost_ratios.json [--device cuda] [--width 0.5]

torchattacks is a benchmark-only tool (`pip install --no-deps torchattacks`: its requests pin conflicts with
huggingface_hub); it is not a casify dependency.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import casify
from casify import attacks
from casify.cas import CASModule
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


def time_pgd(kind: str, model, x, y, device: str, steps: int = 10) -> float:
    model.eval()
    _sync(device)
    t = time.perf_counter()
    if kind == "casify":
        attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=steps, objective="ce")
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


def peak_memory_child(args) -> int:
    """Run one variant in this (fresh) process and return its peak memory growth in bytes."""
    device = args.device
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    variant = args.memory_child
    model = build({"at": "plain", "at_cas": "fx", "fx": "fx", "hand": "hand", "pgd_casify": "plain",
                   "pgd_torchattacks": "plain"}[variant], args.width, device)
    def run():
        if variant in ("at", "at_cas"):
            time_train_step(model, x, y, variant == "at_cas", device)
        elif variant in ("fx", "hand"):
            time_fwd_bwd(model, x, y, device)
        else:
            time_pgd(variant.split("_")[1], model, x, y, device)

    run()  # warm-up: allocator caches and lazy initialisation are not part of the variant's peak
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    import gc
    import threading

    import psutil
    gc.collect()
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cost_ratios.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=0.5, help="CIFAR ResNet-18 width (1.0 = the paper's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(peak_memory_child(args))
        return
    device = args.device
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    plain, fx, hand = build("plain", args.width, device), build("fx", args.width, device), build("hand", args.width, device)
    # the hand-written model computes exactly what the fx-wrapped one does (same weights)
    fx.eval(), hand.eval()
    hand.load_state_dict({k.replace("cas_modules.layer4_0", "cas0").replace("cas_modules.layer4_1", "cas1")
                          if k.startswith("cas_modules") else f"base.{k}": v for k, v in fx.state_dict().items()})
    with torch.no_grad():
        max_diff = (fx(x) - hand(x)).abs().max().item()
    results = {}
    results["cas_overhead"] = interleaved({"at": lambda: time_train_step(plain, x, y, False, device),
                                           "at_cas": lambda: time_train_step(fx, x, y, True, device)}, args.repeats)
    results["surgery_overhead"] = interleaved({"hand": lambda: time_fwd_bwd(hand, x, y, device),
                                               "fx": lambda: time_fwd_bwd(fx, x, y, device)}, args.repeats * 3)
    results["attack_throughput"] = interleaved({"torchattacks": lambda: time_pgd("torchattacks", plain, x, y, device),
                                                "casify": lambda: time_pgd("casify", plain, x, y, device)}, args.repeats)
    ratios = {
        "at_cas_step_over_at_step": results["cas_overhead"]["at_cas"]["median_s"] / results["cas_overhead"]["at"]["median_s"],
        "fx_over_hand_written_fwd_bwd": results["surgery_overhead"]["fx"]["median_s"] / results["surgery_overhead"]["hand"]["median_s"],
        "casify_pgd_over_torchattacks_pgd_time": results["attack_throughput"]["casify"]["median_s"] / results["attack_throughput"]["torchattacks"]["median_s"],
    }
    memory = {}
    for variant in ("at", "at_cas", "hand", "fx", "pgd_torchattacks", "pgd_casify"):
        cmd = [sys.executable, __file__, "--memory-child", variant, "--device", device, "--width", str(args.width),
               "--batch", str(args.batch)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[variant] = int(out.stdout.strip().splitlines()[-1])
    memory_ratios = {"at_cas_over_at": memory["at_cas"] / max(1, memory["at"]),
                     "fx_over_hand": memory["fx"] / max(1, memory["hand"]),
                     "casify_pgd_over_torchattacks": memory["pgd_casify"] / max(1, memory["pgd_torchattacks"])}
    payload = {"benchmark": "cost_ratios", "device": device, "machine": platform.machine(),
               "threads": torch.get_num_threads(), "width": args.width, "batch": args.batch, "repeats": args.repeats,
               "attack_steps": 10, "seed": 0, "versions": {"torch": torch.__version__, "casify": casify.__version__},
               "fx_vs_hand_max_abs_output_diff": max_diff, "timings": results, "ratios": ratios,
               "peak_memory_bytes": memory, "peak_memory_ratios": memory_ratios,
               "memory_method": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else
                                "peak RSS above the pre-run RSS, sampled every 0.5 ms, after one warm-up run, "
                                "in a fresh subprocess per variant"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps({"ratios": ratios, "peak_memory_ratios": memory_ratios, "max_diff": max_diff}, indent=1))


if __name__ == "__main__":
    main()
