"""AutoAttack itself (Croce & Hein, ICML 2020: APGD-CE, APGD-T, FAB-T, Square) as the attack kind ``"autoattack"``,
run on the deployed logits. Its gradient attacks see only the final logits; it raises its own doubts (zero
gradients, Square beating the gradient attacks, randomness) with ``warnings.warn``, which the evaluation keeps."""
from __future__ import annotations

import numbers
from typing import Tuple

from ..defenses.base import Option, choice
from ..core.eps import autoattack_norm, format_radius
from .context import attack_context
from .kinds import AttackKind, register_attack_kind
from .square import AUTOATTACK_INSTALL

PACKAGES = ("pyautoattack", "autoattack")


def load_autoattack() -> Tuple[type, str]:
    """AutoAttack's class and the import name it came from: PyPI's ``pyautoattack`` (imported as ``pyautoattack``)
    or the authors' GitHub package (imported as ``autoattack``)."""
    try:
        from pyautoattack import AutoAttack
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack
        return AutoAttack, "autoattack"
    except ImportError:
        raise ImportError("autoattack=True needs the optional AutoAttack package, which is not installed: "
                          f"{AUTOATTACK_INSTALL}") from None


@register_attack_kind("autoattack")
class AutoAttack(AttackKind):
    """``options``: ``version`` (AutoAttack's), ``seed`` (AutoAttack seeds itself; one seed for the batch), and
    ``attack_class`` / ``package``: the AutoAttack class and the import name it came from (the two packages take
    different keywords), for a caller that loaded it already (the evaluation, which records its version); by default
    the installed package is loaded when the attack runs."""
    objectives = ("ce",)
    routings = ()
    per_example_seed = False
    cascade = "autoattack"
    row_kind = "autoattack"
    OPTIONS = {"version": choice("standard", ["standard", "plus", "rand"]),
               "seed": Option(0, lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
               "attack_class": Option(None, lambda v: v is None or isinstance(v, type), "an AutoAttack class or None"),
               "package": Option(None, lambda v: v is None or v in PACKAGES, f"None or one of {list(PACKAGES)}")}

    def loaded(self, attack) -> Tuple[type, str]:
        if attack.options["attack_class"] is not None:
            return attack.options["attack_class"], attack.options["package"] or "pyautoattack"
        return load_autoattack()

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        aa_class, package = self.loaded(attack)
        norm, version, seed = autoattack_norm(attack.norm), attack.options["version"], attack.options["seed"]
        x = x.contiguous()  # pyautoattack .view()s the input gradient, which fails on a permuted (NHWC) batch
        # eval mode and the deployed routing, which also overrides any label routing a caller left active
        with attack_context(model):
            if package == "pyautoattack":
                aa = aa_class(model, norm=norm, eps=attack.eps, version=version, device=x.device, seed=seed)
                out = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
            else:
                aa = aa_class(model, norm=norm, eps=attack.eps, version=version, device=x.device, seed=seed,
                              verbose=False)
                out = aa.run_standard_evaluation(x, y, bs=x.shape[0])
        x_adv = out[0] if isinstance(out, tuple) else out
        x_adv = x_adv.detach().to(x.device, x.dtype)
        return (x_adv, None) if return_info else x_adv

    def row_objective(self, attack, defended: bool) -> str:
        return "final logits (APGD-CE, APGD-T, FAB-T; Square: black-box)" if defended else "ce"

    def describe(self, attack, defended: bool) -> str:
        parts = " (APGD-CE, APGD-T, FAB-T, Square)" if attack.options["version"] == "standard" else ""
        return f"AutoAttack {attack.options['version']}{parts} on the deployed logits"

    def settings(self, attack, defended: bool) -> dict:
        return {"version": attack.options["version"], "norm": autoattack_norm(attack.norm),
                "package": self.loaded(attack)[1], "seed": attack.options["seed"],
                "eps_str": format_radius(attack.eps, attack.norm)}


__all__ = ["AutoAttack", "PACKAGES", "load_autoattack"]
