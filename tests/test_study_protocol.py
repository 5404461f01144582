"""The studies' judgement (studies/_protocol.py): arms of two code versions, or of a tree with local changes, are
reported and never judged; arms of one commit are judged by the crossed rule with Holm over the family."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location("study_protocol", ROOT / "studies" / "_protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _runs(commit_of=lambda arm, seed: "c" * 40, dirty=False, seeds=(0, 1, 2, 3)):
    rng = np.random.default_rng(0)
    hard = rng.random(300)
    runs = {}
    for arm, shift in (("at", 0.3), ("at_cas", 0.05)):
        for s in seeds:
            flags = [bool(f) for f in rng.random(300) < shift + 0.5 * hard]
            runs[(arm, s)] = {"arm": arm, "seed": s, "worst_case": sum(flags) / 300, "commit": commit_of(arm, s),
                              "dirty": dirty, "_flags": {"worst_case": flags}}
    return runs


def test_one_commit_is_judged_with_holm(protocol):
    comparisons = {"cas": protocol.comparison(_runs(), "at_cas", "at"),
                   "same": protocol.comparison(_runs(), "at", "at")}
    judged = protocol.judge(comparisons)
    assert judged["cas"]["verdict"] == "A worse" and judged["cas"]["p_holm"] >= judged["cas"]["p"]
    assert judged["same"]["verdict"] == "inconclusive" and "_result" not in judged["cas"]


@pytest.mark.parametrize("runs, reason", [
    (_runs(commit_of=lambda arm, seed: ("a" if arm == "at" else "b") * 40), "different code"),
    (_runs(commit_of=lambda arm, seed: None), "different code"),
    (_runs(dirty=True), "local changes"),
    (_runs(seeds=(0, 1)), "the rule needs 3")])
def test_mixed_code_or_too_few_seeds_are_never_judged(protocol, runs, reason):
    out = protocol.judge({"cas": protocol.comparison(runs, "at_cas", "at")})["cas"]
    assert out["verdict"].startswith("not judged") and reason in out["verdict"] and "p_holm" not in out
