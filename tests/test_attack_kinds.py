"""The attack kinds' registry: a new kind is one class registered by name, and it runs as ``Attack(kind=...)`` and as an
evaluation row (named, seeded, in the worst case) with nothing else changed; the built-in kinds (PGD, APGD, Square,
AutoAttack) run through the same registry. Tiny nets on separable data (offline)."""
import contextlib

import pytest
import torch

import casify
from casify.attacks import ATTACK_KINDS, Attack, AttackKind, get_attack_kind, register_attack_kind
from casify.defenses import Option
from casify.evaluate import evaluate
from casify.evaluate.deployed import InputTied
from casify.evaluate.plan import plan_rows
from conftest import SmallConvNet
from test_attacks import NUM_CLASSES, make_data, train

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def registered(name, cls):
    """Register ``cls`` as ``name`` for the duration (the registry is global)."""
    register_attack_kind(name)(cls)
    try:
        yield ATTACK_KINDS[name]
    finally:
        ATTACK_KINDS.pop(name, None)


class ToySign(AttackKind):
    """A random-sign FGSM: every pixel moves by ``eps`` in a random direction drawn from the example's own generator;
    ``options["grey"]`` moves every pixel by ``eps`` towards 0.5 instead (at eps 0.5: the constant grey image)."""
    OPTIONS = {"grey": Option(False, lambda v: isinstance(v, bool), "true or false")}
    calls = []

    def craft(self, attack, model, x, y, *, routing=None, generator=None, return_info=False):
        self.calls.append((x.shape[0], attack.eps, isinstance(generator, list)))
        if attack.options["grey"]:
            step = (0.5 - x).clamp(-attack.eps, attack.eps)
        else:
            noise = torch.stack([torch.rand(x.shape[1:], generator=g) for g in generator]).to(x.device)
            step = attack.eps * torch.where(noise < 0.5, -1.0, 1.0)
        x_adv = (x + step).clamp(0.0, 1.0)
        return (x_adv, None) if return_info else x_adv

    def describe(self, attack, defended):
        return f"toy: random signs of size {attack.eps:g}"


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(1)
    return train(SmallConvNet(NUM_CLASSES))


def test_a_new_kind_is_one_class_and_an_evaluation_row(plain):
    x, y = make_data(24, 3)
    with registered("toy", ToySign):
        direct = Attack(name="toy", kind="toy", eps=0.1)(plain, x, y, generator=[torch.Generator() for _ in y])
        assert (direct - x).abs().max() <= 0.1 + 1e-6 and direct.min() >= 0 and direct.max() <= 1
        ToySign.calls.clear()
        kwargs = dict(attacks=["fgsm", Attack(name="toy", kind="toy", eps=0.1)], eps=0.1, progress=False,
                      checks=False, per_attack=True)
        report = evaluate(plain, (x, y), batch_size=24, **kwargs)
        again = evaluate(plain, (x, y), batch_size=7, **kwargs)
    row = next(r for r in report.attacks if r.name == "toy")
    assert row.notes == "toy: random signs of size 0.1" and row.settings["options"] == {"grey": False}
    assert row.kind == "white-box" and row.settings["kind"] == "toy"
    # every example, from per-example generators (so no example's result depends on its batch)
    assert all(n <= 24 and eps == 0.1 and per_example for n, eps, per_example in ToySign.calls)
    assert report.per_example["toy"] == again.per_example["toy"]
    # it enters the worst case: per example, robust = correct on every row
    assert "toy" in report.worst_case["attacks"]
    rows = ["natural", "fgsm", "toy"]
    expected = [all(report.per_example[r][i] for r in rows) for i in range(len(y))]
    assert report.per_example["worst_case"] == expected
    assert report.worst_case["n_correct"] == sum(expected)


def test_a_new_kind_can_decide_the_worst_case(plain):
    """At eps 0.5 the grey toy sends every image to the constant grey one: the model predicts one class for all, so
    exactly the examples of that class survive the toy row, and the worst case is at most that."""
    x, y = make_data(24, 4)
    with torch.no_grad():
        grey_class = int(plain(torch.full_like(x[:1], 0.5)).argmax(dim=1))
    with registered("toy", ToySign):
        report = evaluate(plain, (x, y), attacks=[Attack(name="toy", kind="toy", eps=0.5, options={"grey": True})],
                          eps=0.5, progress=False, checks=False, per_attack=True)
    assert report.accuracy("toy") == pytest.approx(float((y == grey_class).float().mean()))
    natural = torch.tensor(report.per_example["natural"])
    assert report.worst_case["n_correct"] == int((natural & (y == grey_class)).sum())


def test_unknown_kinds_and_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown attack kind 'nope'; known kinds: \[.*'apgd'.*'pgd'.*'square'"):
        Attack(kind="nope")
    with pytest.raises(ValueError, match=r"attack kind 'square' has no option 'queries' \(in options\); its options are "
                                         r"\['p_init'\]"):
        Attack(kind="square", options={"queries": 10})
    with pytest.raises(ValueError, match=r"options.p_init = 2 is not allowed; expected a number from 0.0 to 1.0"):
        Attack(kind="square", options={"p_init": 2})
    with pytest.raises(ValueError, match=r"objective must be one of \('margin',\)"):
        Attack(kind="square", objective="cas")
    with pytest.raises(ValueError, match=r"already registered"):
        register_attack_kind("pgd")(ToySign)
    with pytest.raises(TypeError, match=r"subclass of AttackKind"):
        register_attack_kind("toy")(object)
    assert "toy" not in ATTACK_KINDS


def test_the_suites_rows_run_through_the_registry(plain, monkeypatch):
    """APGD, APGD-T, Square and AutoAttack rows are Attack specs of their kinds: a stand-in kind registered under
    each name is what the plan's rows call."""
    seen = []

    def spy(name):
        original = type(ATTACK_KINDS[name])

        class Spy(original):
            def craft(self, attack, model, x, y, **kwargs):
                seen.append((name, attack.name, attack.steps, dict(attack.options)))
                return (x.clone(), None) if kwargs.get("return_info") else x.clone()

        spy_kind = Spy()
        spy_kind.name = name
        monkeypatch.setitem(ATTACK_KINDS, name, spy_kind)

    for name in ("apgd", "apgd-t", "square", "autoattack"):
        spy(name)

    class FakeAutoAttack:  # the plan loads the class itself (to record its version); never run here
        pass

    from casify.evaluate import blackbox
    monkeypatch.setattr(blackbox, "load_autoattack", lambda: (FakeAutoAttack, "autoattack"))
    plan = plan_rows(plain, InputTied(plain), "standard", eps=0.1, seed=0, autoattack=True,
                     square_queries=7, checks=False)
    x, y = make_data(4, 5)
    for job in plan.rows:
        if job.name in ("apgd-dlr", "apgd-t3", "square7", "autoattack"):
            job.craft(x, y, {}, torch.Generator())
    assert sorted(seen) == sorted([("apgd", "apgd-dlr", 100, {}), ("apgd-t", "apgd-t3", 100, {"targets": 3}),
                                   ("square", "square7", 7, {"p_init": 0.8}),
                                   ("autoattack", "autoattack", 10, {"version": "standard", "seed": 0,
                                                                     "attack_class": FakeAutoAttack,
                                                                     "package": "autoattack"})])


def test_built_in_kinds_equal_their_functions(plain):
    pytest.importorskip("pyautoattack")
    from casify.attacks.autopgd import apgd, apgd_targeted
    from casify.attacks import square_attack
    x, y = make_data(8, 6)

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(len(y))]

    same = dict(rtol=0, atol=0)
    by_kind = Attack(kind="apgd", eps=0.1, steps=5, objective="dlr_cas")(plain, x, y, generator=gens())
    torch.testing.assert_close(by_kind, apgd(plain, x, y, eps=0.1, steps=5, loss="dlr_cas", generator=gens()), **same)
    by_kind = Attack(kind="apgd-t", eps=0.1, steps=5, options={"targets": 2})(plain, x, y, generator=gens())
    torch.testing.assert_close(by_kind, apgd_targeted(plain, x, y, eps=0.1, steps=5, n_targets=2, routing=None,
                                                      generator=gens()), **same)
    square, info = Attack(kind="square", eps=0.1, steps=20)(plain, x, y, generator=torch.Generator().manual_seed(3),
                                                            return_info=True)
    assert info is None
    torch.testing.assert_close(square, square_attack(plain, x, y, eps=0.1, n_queries=20,
                                                     generator=torch.Generator().manual_seed(3)), **same)
    assert get_attack_kind("cw").name == "cw" and Attack(kind="cw", objective="cas").objective == "cw_cas"
    assert casify.attacks.Attack is Attack
