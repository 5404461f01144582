"""AutoAttack's APGD and APGD-T as attack kinds (``"apgd"``, ``"apgd-t"``): :mod:`casify.attacks.autopgd` behind an
:class:`~casify.attacks.Attack` spec, so the evaluation's APGD rows and ``Attack(kind="apgd")(model, x, y)`` are the
same code. ``steps`` are APGD's iterations (per target for APGD-T); random starts come from per-example generators."""
from __future__ import annotations

from .autopgd import LOSSES, apgd, apgd_targeted
from ..defenses.base import integer
from ..core.eps import format_radius
from .kinds import AttackKind, register_attack_kind

DEPLOYED = "predicted (by each module, as deployed)"
LOSS_WORDS = {"dlr_cas": "DLR", "cas": "CE", "ce": "CE"}


@register_attack_kind("apgd")
class APGD(AttackKind):
    """Untargeted APGD on ``objective``: ``"dlr_cas"`` (DLR of the final logits + beta * mean DLR of the heads),
    ``"cas"`` (the joint CE) or ``"ce"`` (the final logits' CE); the heads' terms vanish on a plain model. Crafted with
    the deployed routing or ``routing="straight-through"``; ``restarts`` on the examples not yet fooled."""
    objectives = LOSSES
    routings = ("straight-through",)
    cascade = "apgd"

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        return apgd(model, x, y, eps=attack.eps, steps=attack.steps, loss=attack.objective,
                    routing=attack.routing if routing is None else routing, restarts=attack.restarts,
                    beta=attack.beta, generator=generator, return_info=return_info, norm=attack.norm)

    def sees_aux(self, attack) -> bool:
        return attack.objective != "ce" or attack.routing == "straight-through"

    def row_objective(self, attack, defended: bool) -> str:
        """The row's loss: on a plain model the joint losses are the final logits' (``"dlr"``, ``"ce"``)."""
        return attack.objective if defended else {"dlr_cas": "dlr", "cas": "ce"}.get(attack.objective, attack.objective)

    def describe(self, attack, defended: bool) -> str:
        words = LOSS_WORDS[attack.objective]
        if defended and attack.objective != "ce":
            loss = f"{words} of the final logits + {attack.beta:g} * mean {words} of the heads"
        else:
            loss = words + (" of the final logits" if defended else "")
        text = f"AutoAttack's APGD, {attack.steps} steps, " + loss
        if attack.restarts > 1:
            text += f", {attack.restarts} restarts"
        if attack.routing == "straight-through":
            text += "; straight-through routing (argmax forward, softmax-mixture backward)"
        return text

    def settings(self, attack, defended: bool) -> dict:
        return {"attack": "APGD (AutoAttack's)", "steps": attack.steps, "loss": self.row_objective(attack, defended),
                "routing": attack.routing or DEPLOYED, "restarts": attack.restarts, "eps": attack.eps,
                "eps_str": format_radius(attack.eps, attack.norm), "norm": attack.norm,
                "random_start": "uniform, per example"}


@register_attack_kind("apgd-t")
class APGDTargeted(AttackKind):
    """APGD-T on the targeted DLR of the final and auxiliary logits (``objective="targeted_dlr_cas"``; the Attack's
    default ``"ce"`` and ``"cas"`` read as that), for each of ``options["targets"]`` classes the clean model ranks
    highest after the true one. ``routing="target"`` routes every module to the target while crafting (routing-
    consistent); None crafts with the deployed routing."""
    objectives = ("targeted_dlr_cas",)
    routings = ("target",)
    cascade = "apgd"
    OPTIONS = {"targets": integer(3, 1, 100_000)}

    def prepare(self, attack) -> None:
        if attack.objective in ("ce", "cas"):
            attack.objective = "targeted_dlr_cas"

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        return apgd_targeted(model, x, y, eps=attack.eps, steps=attack.steps, n_targets=attack.options["targets"],
                             routing=attack.routing if routing is None else routing, beta=attack.beta,
                             generator=generator, return_info=return_info, norm=attack.norm)

    def sees_aux(self, attack) -> bool:
        return True

    def row_objective(self, attack, defended: bool) -> str:
        return "targeted DLR" + (f" of the final logits + {attack.beta:g} * mean over the heads" if defended else "")

    def describe(self, attack, defended: bool) -> str:
        text = (f"AutoAttack's APGD-T, {attack.steps} steps per target, top-{attack.options['targets']} targets, "
                "targeted DLR")
        if defended:
            text += " of the final and auxiliary logits, " + ("every module routed to the target"
                                                             if attack.routing == "target" else "deployed routing")
        return text

    def settings(self, attack, defended: bool) -> dict:
        routing = ("every CAS module routed to the target" if attack.routing == "target" else DEPLOYED) if defended \
            else "none (no CAS modules)"
        return {"attack": "APGD-T (AutoAttack's)", "steps": attack.steps, "targets": attack.options["targets"],
                "loss": self.row_objective(attack, defended), "routing": routing, "eps": attack.eps,
                "eps_str": format_radius(attack.eps, attack.norm), "norm": attack.norm,
                "random_start": "uniform, per example"}


__all__ = ["APGD", "APGDTargeted"]
