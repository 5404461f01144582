"""Validate casify's attacks against trusted ones on real, externally trained robust models (issue: attack validation).

For resnet2b, resnet4b, cifar_cnn_a_adv (CIFAR-10, lossless test846.npz; natural + PGD-20 also on test10k_jpeg.npz,
reported as "test10k-jpeg, approximate") and mnist_wong_kolter (MNIST test set, eps 0.1) this measures

- clean accuracy, casify PGD-20 and PGD-100 (objective "ce", uniform random start, alpha = 2.5 * eps / steps) through
  ``casify.evaluate`` (the deployed-model scoring casify reports), at eps 2/255 and 1/255 (MNIST: 0.1);
- torchattacks' PGD with the same eps / alpha / steps / random start on the same examples;
- standard AutoAttack through ``casify.evaluate(autoattack=True)`` on a timed subset (first k examples);

and reports (a) casify vs torchattacks: accuracy difference with a paired McNemar count (examples only one attack
fools; "within noise" when |b - c| <= 2 sqrt(b + c)) and the unpaired binomial band; (b) casify vs the published
numbers with the sampling band of a subset of n out of the 10,000 test images (2 sigma, finite-population corrected);
(c) AutoAttack <= PGD on the same subset. It also times a full ``evaluate(attacks="standard")`` of a full-width CIFAR
ResNet-18 with CAS at layer4.0 / layer4.1 and extrapolates to 10,000 images (CPU measured; GPU estimated from FLOPs).

    python benchmarks/shared_models_eval.py --models-dir ../shared/models --data-dir ../shared/data \
        --out benchmarks/results/shared_models_eval.json [--max-examples N] [--autoattack-examples N]

Needs torchattacks (benchmark-only: ``pip install --no-deps torchattacks``) and pyautoattack. Run with one intra-op
thread (``--threads 1``, the default): on a shared 2-core machine two OpenMP threads were 4x (batch 846) to 80x
(batch 32) slower per example than one, because each parallel region waits for a descheduled sibling thread.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

import casify
from casify.attacks import Attack
from casify.evaluate import evaluate, format_eps
from casify.models.shared import load_shared_model

SEED = 0
N_TEST = 10000
CIFAR_EPS = [2 / 255, 1 / 255]
MNIST_EPS = [0.1]

# Published numbers (full 10k test set) from /work/shared/models/README.md. cifar_cnn_a_adv has no published figure:
# its reference is a measurement by others on test846 itself (so no subset-sampling band applies, only the binomial
# band of two measurements on the same 846 images with different random starts).
PUBLISHED = {
    "resnet2b": {"source": "alpha-beta-CROWN (published, full CIFAR-10 test set)", "n": N_TEST,
                 "natural": 0.6925, "pgd": {"2/255": 0.5482, "1/255": 0.6224}},
    "resnet4b": {"source": "alpha-beta-CROWN (published, full CIFAR-10 test set)", "n": N_TEST,
                 "natural": 0.7720, "pgd": {"2/255": 0.6141, "1/255": 0.6975}},
    "cifar_cnn_a_adv": {"source": "measured by others on test846 (not published with the file); approximate (~)",
                        "n": 846, "natural": 0.656, "pgd": {"2/255": 0.50}},
    "mnist_wong_kolter": {"source": "Wong & Kolter 2018 (published error 1.8 %, PGD error 4.1 %, full MNIST test set)",
                          "n": N_TEST, "natural": 0.982, "pgd": {"0.1": 0.959}},
}


def eps_key(eps: float) -> str:
    s = format_eps(eps)
    return s if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:g}"


def load_npz(path: Path, split=None):
    with np.load(path, allow_pickle=False) as d:
        x = d["x" if split is None else f"x_{split}"]
        y = d["y" if split is None else f"y_{split}"]
    x = torch.from_numpy(x).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    # contiguous: pyautoattack's zero-gradient check calls .view() on the input gradient, which fails on the
    # channels-last strides a bare permute leaves.
    return x.contiguous(), torch.from_numpy(y.astype(np.int64))


def load_model(models_dir: Path, name: str):
    model, norm = load_shared_model(models_dir / f"{name}.pth")
    size = (1, 28, 28) if name.startswith("mnist") else (3, 32, 32)
    return casify.wrap(model, [], normalize=norm, input_size=size).eval()


@torch.no_grad()
def correct_flags(model, x, y, bs=2048):
    return torch.cat([model(x[i:i + bs]).argmax(1) == y[i:i + bs] for i in range(0, len(x), bs)])


def binom_band(p: float, n: int, population: int = None) -> float:
    """Two standard errors of an accuracy p on n examples (a subset of `population` if given: finite-population)."""
    if n <= 0:
        return 1.0
    se = math.sqrt(max(p * (1 - p), 1.0 / n) / n)
    if population and population > n:
        se *= math.sqrt((population - n) / (population - 1))
    return 2 * se


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Paired comparison of two correct-flag vectors on the same examples."""
    only_a = int((a & ~b).sum())  # a robust, b fooled
    only_b = int((b & ~a).sum())
    d = only_a - only_b
    lim = 2 * math.sqrt(only_a + only_b)
    return {"casify_correct_only": only_a, "torchattacks_correct_only": only_b, "z": d / math.sqrt(only_a + only_b)
            if only_a + only_b else 0.0, "within_noise": abs(d) <= max(lim, 1.0)}


def casify_eval(model, x, y, eps, steps_list, dataset_name, seed, batch_size):
    attacks = [Attack(name=f"pgd{s}", eps=eps, steps=s, objective="ce", random_start=True) for s in steps_list]
    t = time.perf_counter()
    rep = evaluate(model, (x, y), attacks=attacks, eps=eps, checks=False, batch_size=batch_size, seed=seed,
                   progress=False)
    wall = time.perf_counter() - t
    out = {"dataset": dataset_name, "n": rep.n_examples, "wall_s": round(wall, 2), "seeds": rep.seeds,
           "settings": {r.name: r.settings for r in rep.attacks if r.name != "natural"},
           "accuracy": {r.name: r.accuracy for r in rep.attacks},
           "seconds": {r.name: r.seconds for r in rep.attacks}}
    flags = {k: torch.tensor(v) for k, v in rep.per_example.items() if k != "worst_case"}
    return out, flags


def torchattacks_pgd(model, x, y, eps, steps, seed, batch_size):
    import torchattacks
    torch.manual_seed(seed)
    atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    t = time.perf_counter()
    flags = []
    for i in range(0, len(x), batch_size):
        xa = atk(x[i:i + batch_size], y[i:i + batch_size])
        assert float((xa - x[i:i + batch_size]).abs().max()) <= eps + 1e-6
        flags.append(correct_flags(model, xa, y[i:i + batch_size]))
    return torch.cat(flags), time.perf_counter() - t


def autoattack_eval(model, x, y, eps, k_max, budget_s, seed):
    """AutoAttack (standard) via casify.evaluate on the first k examples; k chosen from a timed probe."""
    probe = min(16, k_max)
    t = time.perf_counter()
    rep = evaluate(model, (x[:probe], y[:probe]), attacks=[], eps=eps, autoattack=True, checks=False,
                   batch_size=probe, seed=seed, progress=False)
    per_ex = (time.perf_counter() - t) / probe
    k = int(max(probe, min(k_max, budget_s / max(per_ex, 1e-6))))
    if k > probe:
        t = time.perf_counter()
        rep = evaluate(model, (x[:k], y[:k]), attacks=[], eps=eps, autoattack=True, checks=False,
                       batch_size=min(k, 500), seed=seed, progress=False)
        wall = time.perf_counter() - t
    else:
        wall = per_ex * probe
    return {"n": k, "accuracy": rep.accuracy("autoattack"), "natural_on_subset": rep.accuracy("natural"),
            "probe_s_per_example": round(per_ex, 3), "wall_s": round(wall, 2),
            "settings": [r.settings for r in rep.attacks if r.name == "autoattack"][0],
            "versions": rep.versions}, torch.tensor(rep.per_example["autoattack"])


def eval_model(name, models_dir, data_dir, args, rows):
    t_model = time.perf_counter()
    model = load_model(models_dir, name)
    mnist = name.startswith("mnist")
    if mnist:
        x, y = load_npz(data_dir / "mnist" / "mnist.npz", "test")
        ds_name, eps_list, population = "mnist test (official, lossless)", MNIST_EPS, N_TEST
    else:
        x, y = load_npz(data_dir / "cifar10" / "test846.npz")
        ds_name, eps_list, population = "cifar10 test846 (first 846 official test images, lossless)", CIFAR_EPS, N_TEST
    if args.max_examples:
        x, y = x[:args.max_examples], y[:args.max_examples]
    n = len(x)
    pub = PUBLISHED[name]
    pub_pop = population if pub["n"] == N_TEST else None  # subset-of-10k band only for full-test-set figures
    res = {"dataset": ds_name, "n": n, "eps": [eps_key(e) for e in eps_list], "published": pub, "per_eps": {}}
    bs = args.batch_size
    for eps in eps_list:
        ek = eps_key(eps)
        print(f"[{name}] eps {ek}: casify PGD-20/100 on {n}", flush=True)
        cas, cflags = casify_eval(model, x, y, eps, [20, 100], ds_name, args.seed, bs)
        entry = {"casify": cas, "torchattacks": {}, "agreement": {}, "vs_published": {}}
        nat = cflags["natural"]
        for steps in (20, 100):
            print(f"[{name}] eps {ek}: torchattacks PGD-{steps}", flush=True)
            tflags, secs = torchattacks_pgd(model, x, y, eps, steps, args.seed, bs)
            ta_acc = float(tflags.float().mean())
            ca = cflags[f"pgd{steps}"]
            ca_acc = float(ca.float().mean())
            mc = mcnemar(ca, tflags)
            band = binom_band((ca_acc + ta_acc) / 2, n) * math.sqrt(2)  # unpaired difference of two accuracies
            entry["torchattacks"][f"pgd{steps}"] = {
                "accuracy": ta_acc, "seconds": round(secs, 2), "torch_seed": args.seed,
                "settings": {"eps": eps, "eps_str": ek, "alpha": 2.5 * eps / steps, "steps": steps,
                             "random_start": True, "loss": "CrossEntropyLoss (mean over batch)"}}
            entry["agreement"][f"pgd{steps}"] = {
                "casify": ca_acc, "torchattacks": ta_acc, "difference_casify_minus_ta": ca_acc - ta_acc,
                "unpaired_2sigma_band": band, "mcnemar": mc,
                "within_noise": mc["within_noise"] and abs(ca_acc - ta_acc) <= band,
                "casify_weaker_than_ta": ca_acc > ta_acc}
            pub_pgd = pub["pgd"].get(ek)
            if pub_pgd is not None:
                pband = binom_band(pub_pgd, n, pub_pop) if pub_pop else binom_band(pub_pgd, n) * math.sqrt(2)
                entry["vs_published"][f"pgd{steps}"] = {"published": pub_pgd, "casify": ca_acc,
                                                        "difference": ca_acc - pub_pgd, "band_2sigma": pband,
                                                        "within_noise": abs(ca_acc - pub_pgd) <= pband}
            rows.append({"model": name, "data": "test846" if not mnist else "mnist-test",
                         "metric": f"PGD-{steps} @ {ek}", "n": n, "casify": ca_acc, "torchattacks": ta_acc,
                         "published": pub_pgd, "pub_band": entry["vs_published"].get(f"pgd{steps}", {}).get(
                             "band_2sigma"), "ta_within": entry["agreement"][f"pgd{steps}"]["within_noise"],
                         "mcnemar": (mc["casify_correct_only"], mc["torchattacks_correct_only"]),
                         "pub_within": entry["vs_published"].get(f"pgd{steps}", {}).get("within_noise")})
        nat_acc = float(nat.float().mean())
        pband = binom_band(pub["natural"], n, pub_pop) if pub_pop else binom_band(pub["natural"], n) * math.sqrt(2)
        res["natural"] = {"casify": nat_acc, "published": pub["natural"], "band_2sigma": pband,
                          "within_noise": abs(nat_acc - pub["natural"]) <= pband}
        if eps == eps_list[0]:
            rows.insert(len(rows) - 2, {"model": name, "data": "test846" if not mnist else "mnist-test",
                                        "metric": "clean", "n": n, "casify": nat_acc, "torchattacks": None,
                                        "published": pub["natural"], "pub_band": pband, "ta_within": None,
                                        "pub_within": res["natural"]["within_noise"]})
        if eps == eps_list[0] and args.autoattack_examples > 0:
            print(f"[{name}] eps {ek}: AutoAttack (standard) on a timed subset", flush=True)
            aa, aflags = autoattack_eval(model, x, y, eps, args.autoattack_examples, args.autoattack_budget_s,
                                         args.seed)
            k = aa["n"]
            pgd_sub = {f"casify_pgd{s}": float(cflags[f"pgd{s}"][:k].float().mean()) for s in (20, 100)}
            robust_aa_fooled_pgd = int((aflags & ~cflags["pgd100"][:k] ).sum())
            aa.update(pgd_sub)
            aa["aa_le_pgd100"] = aa["accuracy"] <= pgd_sub["casify_pgd100"] + 1e-12
            aa["examples_robust_to_aa_but_fooled_by_pgd100"] = robust_aa_fooled_pgd
            entry["autoattack"] = aa
            rows.append({"model": name, "data": f"test846[:{k}]" if not mnist else f"mnist-test[:{k}]",
                         "metric": f"AutoAttack @ {ek} (PGD-100 on same {k}: {100 * pgd_sub['casify_pgd100']:.2f})",
                         "n": k, "casify": aa["accuracy"], "torchattacks": None, "published": None,
                         "pub_band": None, "ta_within": None, "pub_within": None,
                         "note": "AA <= PGD-100: " + ("yes" if aa["aa_le_pgd100"] else "NO")})
        res["per_eps"][ek] = entry
    if not mnist and args.jpeg_examples > 0:
        xj, yj = load_npz(data_dir / "cifar10" / "test10k_jpeg.npz")
        xj, yj = xj[:args.jpeg_examples], yj[:args.jpeg_examples]
        jres = {"dataset": "test10k-jpeg, approximate (JPEG-recovered, mean abs error ~5.8/255; not the official set)",
                "n": len(xj), "per_eps": {}}
        for eps in eps_list:
            ek = eps_key(eps)
            print(f"[{name}] test10k-jpeg eps {ek}: casify PGD-20 + torchattacks PGD-20 on {len(xj)}", flush=True)
            cas, cflags = casify_eval(model, xj, yj, eps, [20], "test10k-jpeg", args.seed, bs)
            tflags, secs = torchattacks_pgd(model, xj, yj, eps, 20, args.seed, bs)
            ca, ta = float(cflags["pgd20"].float().mean()), float(tflags.float().mean())
            mc = mcnemar(cflags["pgd20"], tflags)
            pub_pgd = pub["pgd"].get(ek)
            jres["natural"] = cas["accuracy"]["natural"]
            jres["per_eps"][ek] = {"casify": cas, "torchattacks_pgd20": ta, "torchattacks_seconds": round(secs, 2),
                                   "mcnemar": mc, "published": pub_pgd}
            if eps == eps_list[0]:
                rows.append({"model": name, "data": "test10k-jpeg (approx.)", "metric": "clean", "n": len(xj),
                             "casify": jres["natural"], "torchattacks": None, "published": pub["natural"],
                             "pub_band": None, "ta_within": None, "pub_within": None,
                             "note": "JPEG copy: ~0.5-1 pt below the true test set"})
            rows.append({"model": name, "data": "test10k-jpeg (approx.)", "metric": f"PGD-20 @ {ek}", "n": len(xj),
                         "casify": ca, "torchattacks": ta, "published": pub_pgd if pub["n"] == N_TEST else None,
                         "pub_band": None, "ta_within": mc["within_noise"],
                         "mcnemar": (mc["casify_correct_only"], mc["torchattacks_correct_only"]), "pub_within": None,
                         "note": "approximate: JPEG error exceeds eps"})
        res["test10k_jpeg"] = jres
    res["seconds"] = round(time.perf_counter() - t_model, 1)
    return res


def full_eval_time_estimate(args) -> dict:
    """Time evaluate(attacks="standard") of a full-width CIFAR ResNet-18 with CAS on a few batches; extrapolate."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(args.seed)
    base = timm.create_model("cifar_resnet18", num_classes=10)
    model = casify.wrap(base, ["layer4.0", "layer4.1"], input_size=(3, 32, 32)).eval()
    bs, nb = args.timing_batch, args.timing_batches
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(bs * nb, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (bs * nb,), generator=g)
    # FLOPs of one attack step (forward + input gradient) per example, counted by PyTorch's FlopCounterMode.
    # Parameters are frozen for the count: an attack takes only the input gradient (no weight gradients).
    xi = x[:1].clone().requires_grad_(True)
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        model(xi).sum().backward()
    for q, r in flags:
        q.requires_grad_(r)
    step_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x[:1])
    fwd_flops = fc.get_total_flops()
    t = time.perf_counter()
    rep = evaluate(model, (x, y), attacks="standard", eps=8 / 255, batch_size=bs, seed=args.seed, progress=False)
    wall = time.perf_counter() - t
    per_image = wall / len(x)
    cpu_10k = per_image * N_TEST
    # Gradient steps per image in the standard suite for a model with 2 CAS modules, from the report's settings:
    grad_steps = sum(r.settings.get("steps", 0) * r.settings.get("restarts", 1) for r in rep.attacks
                     if r.kind in ("white-box", "adaptive")) + 20  # + PGD-20 at 128/255 for the eps_monotone check
    forwards = len(rep.attacks) + 1 + 1 + 1  # one scoring forward per row, clean routings, the large-eps row, probe
    total_flops_per_image = grad_steps * step_flops + forwards * fwd_flops
    achieved = total_flops_per_image / per_image
    threads = torch.get_num_threads()
    ghz = 2.445  # /proc/cpuinfo "cpu MHz" of this AMD EPYC (AVX2 + FMA, no AVX-512)
    cpu_peak = threads * ghz * 1e9 * 32  # 2 x 256-bit FMA units: 32 FP32 FLOP / cycle / core
    gpu = {  # NVIDIA H100 SXM5 datasheet (dense): FP32 67 TFLOPS, TF32 tensor 494.7 TFLOPS (989.4 with sparsity)
        "device": "NVIDIA H100 SXM5 (datasheet)", "fp32_peak_flops": 67e12, "tf32_tensor_peak_flops_dense": 494.7e12}
    same_util = cpu_10k * cpu_peak / gpu["fp32_peak_flops"]  # same fraction of FP32 peak as this CPU achieved
    low_util = N_TEST * total_flops_per_image / (0.10 * gpu["fp32_peak_flops"])
    high_util = N_TEST * total_flops_per_image / (0.25 * gpu["tf32_tensor_peak_flops_dense"])
    return {
        "model": "timm cifar_resnet18 (full width, untrained) + CAS at layer4.0, layer4.1 (casify.wrap, identity init)",
        "suite": "standard (natural, fgsm, pgd20, cw20, pgd100, aux0/aux1-pgd20, pgd20-route-predicted/soft) + "
                 "checks (noise, pgd20@128/255, gradient probe); no AutoAttack",
        "eps": "8/255", "measured_images": len(x), "batch_size": bs, "batches": nb, "torch_threads": threads,
        "cpu": f"{platform.processor() or 'AMD EPYC'} ({threads} thread(s) of a shared 2-core VM)",
        "cpu_wall_s": round(wall, 2), "cpu_s_per_image": round(per_image, 3),
        "per_row_seconds": {r.name: r.seconds for r in rep.attacks + rep.eps_sweep},
        "cpu_estimate_10k_s": round(cpu_10k, 0), "cpu_estimate_10k_h": round(cpu_10k / 3600, 2),
        "gradient_steps_per_image": grad_steps, "flops_per_attack_step_per_image": step_flops,
        "flops_forward_per_image": fwd_flops, "flops_per_image_total": total_flops_per_image,
        "cpu_achieved_flops_per_s": achieved, "cpu_peak_flops_per_s_assumed": cpu_peak,
        "cpu_fraction_of_peak": achieved / cpu_peak,
        "gpu_reference": gpu,
        "gpu_estimate_10k_s": {
            "same_fraction_of_peak_as_cpu_fp32": round(same_util, 1),
            "pessimistic_10pct_of_fp32_peak": round(low_util, 1),
            "optimistic_25pct_of_tf32_tensor_peak": round(high_util, 1)},
        "note": "ESTIMATE ONLY: no GPU was available to this run. GPU time = the measured FLOP count per image "
                "(FlopCounterMode) x 10,000 / an assumed fraction of the H100 datasheet throughput; cuDNN convs use "
                "TF32 by default in PyTorch, so the tensor-core figure applies to most of the FLOPs, but small 32x32 "
                "batches rarely reach it. The CPU extrapolation assumes time is linear in the number of images.",
    }


def fmt(v):
    return "" if v is None else f"{100 * v:.2f}"


def write_markdown(path: Path, result: dict):
    lines = ["# casify attacks vs torchattacks / AutoAttack / published numbers on the shared robust models", "",
             "Generated by `benchmarks/shared_models_eval.py`. Accuracies in %. casify PGD: objective \"ce\", uniform "
             "random start, alpha = 2.5 eps / steps, scored by `casify.evaluate`; torchattacks `PGD` with the same "
             "eps / alpha / steps / random start on the same examples. \"within noise?\": torchattacks = paired "
             "McNemar (|b - c| <= 2 sqrt(b + c), b / c = examples only casify / only torchattacks leaves correct, "
             "shown as b/c) and the unpaired 2-sigma binomial band; published = 2-sigma band of a subset of n of the "
             "10,000 test images (finite-population corrected). Published figures are on the full test set "
             "(cifar_cnn_a_adv: a measurement by others on test846, not published); the published PGD settings "
             "(steps, restarts) are not known, so agreement there is indicative.", "",
             "| model | data | metric | n | casify | torchattacks | published | within noise? |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        notes = []
        if r.get("ta_within") is not None:
            b, c = r["mcnemar"]
            notes.append(f"TA: {'yes' if r['ta_within'] else '**NO**'} ({b}/{c})")
        if r.get("pub_within") is not None:
            notes.append(f"pub: {'yes' if r['pub_within'] else '**NO**'} (±{100 * r['pub_band']:.1f})")
        if r.get("note"):
            notes.append(r["note"])
        lines.append(f"| {r['model']} | {r['data']} | {r['metric']} | {r['n']} | {fmt(r['casify'])} | "
                     f"{fmt(r['torchattacks'])} | {fmt(r['published'])} | {'; '.join(notes)} |")
    est = result.get("full_eval_time_estimate")
    if est:
        g = est["gpu_estimate_10k_s"]
        lines += ["", "## Full `evaluate(attacks=\"standard\")` time, CIFAR ResNet-18 + CAS (layer4.0, layer4.1)", "",
                  f"- measured on CPU: {est['measured_images']} images ({est['batches']} batches of "
                  f"{est['batch_size']}) in {est['cpu_wall_s']} s = {est['cpu_s_per_image']} s / image "
                  f"({est['torch_threads']} thread); 10,000 images: ~{est['cpu_estimate_10k_h']} h",
                  f"- {est['gradient_steps_per_image']} gradient steps / image, "
                  f"{est['flops_per_attack_step_per_image'] / 1e9:.2f} GFLOP per step; CPU achieved "
                  f"{est['cpu_achieved_flops_per_s'] / 1e9:.1f} GFLOP/s "
                  f"({100 * est['cpu_fraction_of_peak']:.0f} % of an assumed {est['cpu_peak_flops_per_s_assumed'] / 1e9:.0f} GFLOP/s peak)",
                  f"- H100 **estimate (no GPU was available)**: {g['optimistic_25pct_of_tf32_tensor_peak']:.0f} s "
                  f"(25 % of TF32 tensor peak) to {g['pessimistic_10pct_of_fp32_peak']:.0f} s (10 % of FP32 peak); "
                  f"same fraction of FP32 peak as the CPU: {g['same_fraction_of_peak_as_cpu_fp32']:.0f} s", ""]
    if result.get("findings"):
        lines += ["## Findings", ""] + [f"- {f}" for f in result["findings"]] + [""]
    path.write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, type=Path)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_models_eval.json"))
    p.add_argument("--max-examples", type=int, default=None, help="cap on test846 / MNIST examples (default: all)")
    p.add_argument("--autoattack-examples", type=int, default=200, help="max AutoAttack subset (0: skip)")
    p.add_argument("--autoattack-budget-s", type=float, default=150.0, help="time budget per model for AutoAttack")
    p.add_argument("--jpeg-examples", type=int, default=10000, help="test10k-jpeg examples (0: skip)")
    p.add_argument("--models", nargs="*", default=["resnet2b", "resnet4b", "cifar_cnn_a_adv", "mnist_wong_kolter"])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--timing-batch", type=int, default=8)
    p.add_argument("--timing-batches", type=int, default=2)
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    import torchattacks
    from importlib import metadata
    from casify.core.spec import versions
    vers = versions()
    vers.update({"torchattacks": torchattacks.__version__, "pyautoattack": metadata.version("pyautoattack"),
                 "numpy": np.__version__})
    rows, models = [], {}
    for name in args.models:
        models[name] = eval_model(name, args.models_dir, args.data_dir, args, rows)
        print(f"[{name}] done in {models[name]['seconds']} s", flush=True)
    result = {"meta": {"seed": args.seed, "torch_threads": args.threads, "batch_size": args.batch_size,
                       "versions": vers, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "args": {k: str(v) for k, v in vars(args).items()},
                       "protocol": {"casify_pgd": "casify.evaluate with Attack(steps in {20, 100}, objective='ce', "
                                                  "random_start=True, alpha=2.5*eps/steps), checks off; seeds per "
                                                  "row in models.*.per_eps.*.casify.seeds",
                                    "torchattacks_pgd": "torchattacks.PGD(eps, alpha=2.5*eps/steps, steps, "
                                                        "random_start=True), torch.manual_seed(seed) before each run",
                                    "autoattack": "casify.evaluate(attacks=[], autoattack=True) = pyautoattack "
                                                  "standard (APGD-CE, APGD-T, FAB-T, Square), seed = seed, on the "
                                                  "first n examples (n from a timed probe and a time budget)",
                                    "noise_torchattacks": "paired McNemar |b-c| <= 2 sqrt(b+c) and |diff| <= "
                                                          "2 sqrt(2 p (1-p) / n)",
                                    "noise_published": "2 sqrt(p (1-p) / n) * sqrt((N-n)/(N-1)), N = 10,000 "
                                                       "(cifar_cnn_a_adv: 2 sqrt(2 p (1-p) / n), same 846 images)"}},
              "models": models, "rows": rows}
    if not args.skip_timing:
        print("timing a full standard evaluation of a CIFAR ResNet-18 with CAS", flush=True)
        result["full_eval_time_estimate"] = full_eval_time_estimate(args)
    result["meta"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(args.out.with_suffix(".md"), result)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
