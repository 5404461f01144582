"""A new defense or attack kind is ONE file in its folder and no other edit.

Each toy below is written as a file into a folder that the package's own discovery reads (the folder is added to
``casify.defenses.__path__`` / ``casify.attacks.__path__`` for the test, as a file in ``casify/defenses/`` would be
there already), then imported by the same function that runs when the package is imported. Nothing else is edited:
the headless defense wraps, trains one step under every method and is evaluated; the attack kind declares its own
place in the cascade and its row kind, and the evaluation obeys.
"""
import sys
import textwrap

import pytest
import torch

import casify
import casify.attacks
import casify.defenses
from casify.attacks import ATTACK_KINDS, Attack, CASCADE_GROUPS
from casify.defenses import DEFENSES
from casify.evaluate import evaluate
from casify.evaluate.deployed import InputTied
from casify.evaluate.plan import CASCADE_RANKS, plan_rows
from casify.losses import get_loss

from conftest import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")

HEADLESS_DEFENSE = '''
"""A toy defense without auxiliary heads: a learned per-channel gate (nothing to route, nothing to supervise)."""
import torch
from torch import nn

from .base import DefenseModule, register_defense


@register_defense
class ToyGate(DefenseModule):
    name = "toy_gate"
    head_names = ()
    layouts = ("channels-first",)

    def __init__(self, num_channels, num_classes, channel_dim=1, ndim=4, init="identity", device=None, dtype=None):
        super().__init__()
        self.num_channels, self.num_classes = num_channels, num_classes
        self.gate = nn.Parameter(torch.ones(num_channels))

    def forward(self, f):
        return f * torch.sigmoid(4 * self.gate)[:, None, None]

    def aux_outputs(self):
        return []
'''

GREY_ATTACK = '''
"""A toy attack kind: every pixel moves by eps towards mid-grey; outputs only, so it runs with the black-box rows."""
from .kinds import AttackKind, register_attack_kind


@register_attack_kind("toy_grey")
class ToyGrey(AttackKind):
    objectives = ("ce",)
    routings = ()
    cascade = "black-box"
    row_kind = "black-box"

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        x_adv = (x + (0.5 - x).clamp(-attack.eps, attack.eps)).clamp(0.0, 1.0)
        return (x_adv, None) if return_info else x_adv

    def describe(self, attack, defended):
        return f"toy: towards grey by {attack.eps:g}"
'''


def _add_file(package, discover, folder, name, text, registry, key):
    """Write ``name``.py into ``folder``, put the folder on the package's path and run the package's discovery."""
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    package.__path__.append(str(folder))
    try:
        discover()
    finally:
        package.__path__.remove(str(folder))
    assert key in registry, f"{package.__name__}'s discovery did not import {name}.py"


@pytest.fixture
def headless(tmp_path):
    _add_file(casify.defenses, casify.defenses.import_defense_files, tmp_path, "toy_gate", HEADLESS_DEFENSE,
              DEFENSES, "toy_gate")
    yield DEFENSES["toy_gate"]
    DEFENSES.pop("toy_gate", None)
    sys.modules.pop("casify.defenses.toy_gate", None)


@pytest.fixture
def grey(tmp_path):
    _add_file(casify.attacks, casify.attacks.import_kind_files, tmp_path, "toy_grey", GREY_ATTACK, ATTACK_KINDS,
              "toy_grey")
    yield ATTACK_KINDS["toy_grey"]
    ATTACK_KINDS.pop("toy_grey", None)
    sys.modules.pop("casify.attacks.toy_grey", None)


def _data(n=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_a_headless_defense_from_one_file_wraps_trains_and_is_evaluated(headless):
    torch.manual_seed(0)
    model = casify.wrap(TinyNet(), layers=["block"], input_size=(3, 8, 8), normalize=None, defense="toy_gate")
    assert [type(m).__name__ for m in casify.defenses.find_defense_modules(model)] == ["ToyGate"]
    x, y = _data()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    for method in ("standard", "at", "trades", "mart"):  # every joint loss with zero heads: the heads' term is 0
        model.zero_grad()
        loss, metrics = get_loss(method, cas=True)(model.train(), x, x_adv, y)
        loss.backward()
        gate = casify.defenses.find_defense_modules(model)[0].gate
        assert torch.isfinite(loss) and gate.grad is not None and torch.isfinite(gate.grad).all(), method
        assert all(float(v) == 0.0 for k, v in metrics.items() if k.startswith("aux_")), (method, metrics)
    # the adaptive objectives see no heads and reduce to the plain ones
    report = evaluate(model.eval(), (x, y), attacks="quick", eps=4 / 255, progress=False, checks=False,
                      per_attack=True)
    assert report.accuracy("natural") is not None and report.worst_case["n_correct"] <= int(
        sum(report.per_example["natural"]))


def test_an_attack_kind_from_one_file_says_where_it_runs(grey):
    torch.manual_seed(0)
    model = TinyNet().eval()
    attack = Attack(name="grey", kind="toy_grey", eps=0.5)
    plan = plan_rows(model, InputTied(model), [attack], eps=0.5, seed=0, checks=False)
    job = next(j for j in plan.rows if j.name == "grey")
    assert job.kind == "black-box" and job.rank == CASCADE_RANKS["black-box"] == CASCADE_GROUPS.index("black-box")
    x, y = _data()
    report = evaluate(model, (x, y), attacks=["fgsm", attack], eps=0.5, progress=False, checks=False)
    row = next(r for r in report.attacks if r.name == "grey")
    assert row.kind == "black-box" and row.notes == "toy: towards grey by 0.5"
    # at eps 0.5 every image becomes the constant grey one: only the examples of the class it predicts survive
    with torch.no_grad():
        grey_class = int(model(torch.full_like(x[:1], 0.5)).argmax(dim=1))
    natural = torch.tensor(report.per_example["natural"]) & torch.tensor(report.per_example["fgsm"])
    assert report.worst_case["n_correct"] == int((natural & (y == grey_class)).sum())


def test_a_kind_that_names_no_cascade_group_is_refused(tmp_path):
    bad = GREY_ATTACK.replace('"toy_grey"', '"toy_lost"').replace('cascade = "black-box"', 'cascade = "last"')
    (tmp_path / "toy_lost.py").write_text(bad)
    casify.attacks.__path__.append(str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"cascade 'last' is not a cascade group; use one of \['every example'"):
            casify.attacks.import_kind_files()
    finally:
        casify.attacks.__path__.remove(str(tmp_path))
        sys.modules.pop("casify.attacks.toy_lost", None)
    assert "toy_lost" not in ATTACK_KINDS
