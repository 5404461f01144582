"""White-box attacks in pixel space: PGD (L-inf, L2), FGSM and CW-inf, with objectives and routings that know about CAS.

Every attack crafts its examples the way the authors' code does (``shared/docs/cas-reference.md``): the model in eval
mode (batch norm on running statistics) and every CAS module routed by its own prediction, unless the caller passes a
routing. The model's train/eval state is restored module by module afterwards, and only input gradients are taken
(``torch.autograd.grad``), so parameters' ``.grad`` are never touched and an attack can run in the middle of a training
step. Losses are computed in float32 even under autocast, and the loss gradient is rescaled per example at the model's
outputs so that input gradients do not underflow in half precision (only the gradient's direction is used). An
objective may therefore depend on the input only through the logits and auxiliary logits it is given; the logits may
themselves depend on the auxiliary logits (a straight-through routing does that).

**Best iterate.** CAS routes by an argmax, so the loss surface is piecewise and the last PGD iterate is often not the
best one: an iterate that fooled the model can be followed by one that does not. By default (``keep="best"``) every
iterative attack scores each iterate on the *deployed* model (eval mode, each CAS module routed by its own prediction,
``argmax(logits) != y``) and returns, per example, an iterate that fools it if any iterate did (the one with the
largest wrong-class margin), else the iterate with the smallest margin of the true class (the later one on ties).
The scoring reuses the forward that computes the gradient when the attack crafts with the deployed routing; restarts
keep the per-example worst over all restarts. ``keep="last"`` returns the last iterate (the training presets use it).

Objectives are per-example losses to *maximise*; they are looked up by name (see :data:`OBJECTIVES`):

- ``"ce"``: cross-entropy of the final logits.
- ``"cas"``: CE + beta * mean over CAS modules of the auxiliary CE (the authors' adaptive attack; equals ``"ce"`` on a
  model without CAS modules).
- ``"aux:<i>"``: the CE of auxiliary head ``i`` alone (flipping one module's argmax changes its mask).
- ``"cw"``: the per-example CW margin ``min(max_{j!=y} z_j - z_y, kappa)`` of the final logits.
- ``"cw_cas"``: the CW margin of the final logits + beta * mean over CAS modules of the same margin of each auxiliary
  head (equals ``"cw"`` on a model without CAS modules); ``"cw_aux:<i>"``: the margin of auxiliary head ``i`` alone.
- ``"kl"``: TRADES' inner objective ``KL(p(x) || p(x'))`` with the clean probabilities (eval mode, same routing) as
  the fixed target; ``"cas_kl"`` adds beta * mean over CAS modules of the same KL per auxiliary head.

Routings (``routing=``) for crafting; scoring always uses the deployed routing:

- ``None`` / ``"predicted"``: each CAS module routes by its own prediction (as deployed);
- ``"straight-through"``: the forward routes by the argmax as deployed, the backward treats each module's mask as the
  softmax mixture of weight rows (BPDA; the gradient reaches the class choice that the argmax blocks);
- ``"clean-predicted"`` / ``"clean-soft"``: fixed for the whole attack to the model's clean predicted class, or to
  the softmax mixture of rows from the clean auxiliary logits (mean over modules);
- ``"labels"`` (leaks the label; diagnostics only), or a tensor of class indices (N,) / soft weights (N, classes).

**Attack kinds.** ``Attack(kind=...)`` runs through a registry (:data:`ATTACK_KINDS`, :func:`register_attack_kind`):
``pgd``, ``fgsm`` and ``cw`` (``pgd.py``), ``apgd`` and ``apgd-t`` (``apgd.py``: AutoAttack's APGD on casify's
objectives, :mod:`casify.attacks.autopgd`), ``square`` (``square.py``), ``autoattack`` (``autoattack.py``), and the
single-step training attacks ``fgsm_rs`` (``fgsm_rs.py``: FGSM with a random start) and ``n_fgsm`` (``n_fgsm.py``:
N-FGSM, whose examples leave the eps-ball by design, so the evaluation refuses it). The evaluation builds every row
from an :class:`Attack` through the same registry, so a new kind is one file (``docs/architecture.md``): every module
of this folder is imported with the package (:func:`import_kind_files`), and a kind declares where its rows run in the
evaluation's cascade (``AttackKind.cascade``) and what kind of row it makes (``AttackKind.row_kind``).

One job per file (each imports only the ones before it): ``constants.py`` (norms, starts, routings),
``objectives.py`` (the objectives and their registry), ``context.py`` (eval mode and routings while attacking, the
deployed scoring), ``steps.py`` (gradient directions, steps, projections, random starts), ``kinds.py`` (the attack
kinds' registry), ``pgd.py`` (PGD, FGSM, CW-inf, best iterate), ``spec.py`` (:class:`Attack` and the presets), then
one file per further kind.
"""
from .constants import (KEEPS, KINDS, NORMS, ROUTINGS, Routing, STARTS, STRAIGHT_THROUGH_TEMPERATURE)
from .objectives import (NEEDS_CLEAN, OBJECTIVES, Objective, ObjectiveInput, aux_mean, aux_objective,
                         cas_kl_objective, cas_objective, ce_objective, class_mask, cw_cas_objective, cw_margin,
                         cw_objective, get_objective, kl_objective, kl_per_example, objective_tag, predicted_correctly,
                         register_objective, sees_aux)
from .context import (StraightThrough, attack_context, attack_target, clean_routing, deployed_routing, forward_logits,
                      is_low_precision)
from .steps import (Generators, draw_noise, input_grad_direction, output_grads, owned_float32, project, project_,
                    random_start_point, resolve_alpha, rows_finite_nonzero, rows_norm, select_rows_, start_kind,
                    step_)
from .kinds import ATTACK_KINDS, CASCADE_GROUPS, ROW_KINDS, AttackKind, get_attack_kind, register_attack_kind, resolve_options
from .pgd import (AttackInfo, BestIterate, CW_OBJECTIVES, cw_inf, fgsm, is_cw_objective, pgd, resolve_routing)
from .spec import (Attack, PRESETS, get_attack)
# the kinds beyond the PGD family (after spec: they import autopgd.py and threat_model.py, which import it)
from .apgd import APGD, APGDTargeted
from .square import SQUARE_P_INIT, Square, load_square, square_attack
from .autoattack import AutoAttack, load_autoattack
# the single-step training attacks (FGSM with a random start, N-FGSM): casify.train's `train.attack`
from .fgsm_rs import FGSMRandomStart
from .n_fgsm import NFGSM


def import_kind_files() -> None:
    """Import every module of this folder, so that a file holding a new kind registers it with no import to add here
    (the kinds above are imported by name only because they are public names of the package)."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


import_kind_files()

__all__ = ["ATTACK_KINDS", "Attack", "AttackInfo", "AttackKind", "KEEPS", "OBJECTIVES", "ObjectiveInput", "PRESETS",
           "ROUTINGS", "attack_context", "clean_routing", "cw_inf", "cw_margin", "fgsm", "get_attack",
           "get_attack_kind", "get_objective", "kl_per_example", "objective_tag", "pgd", "predicted_correctly",
           "register_attack_kind",
           "register_objective", "resolve_alpha", "sees_aux"]
