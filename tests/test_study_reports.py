"""The earlier studies in their folders under studies/: each script imports from its new place (as a package, no
sys.path edits), and what its report functions write from its committed JSON is its committed report (so a `--report`
rerun would not move a number or break a link); no study script is left in benchmarks/, and every relative link in
the studies' and benchmarks' markdown resolves."""
import argparse
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"
MOVED = ("paper_claims", "eval_strength", "cas_study", "retrofit_study", "retrofit_standard", "reproduce_gpu")


@pytest.fixture(scope="module")
def studies_importable():
    # the studies run as `python -m studies.<name>.study` from the repository root; plain `pytest` does not put the
    # root on the path
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield


def _json(path: Path):
    return json.loads(path.read_text())


def test_reports_are_what_the_scripts_write_from_the_committed_results(studies_importable):
    from studies.cas_study import study as cas_study
    from studies.eval_strength import study as eval_strength
    from studies.retrofit_standard import study as retrofit_standard
    from studies.retrofit_study import study as retrofit

    strength = STUDIES / "eval_strength"
    assert eval_strength.markdown(_json(strength / "results" / "eval_strength.json")) == \
        (strength / "README.md").read_text()

    cas = STUDIES / "cas_study"
    record, family = _json(cas / "results" / "cas_study.json"), _json(cas / "results" / "defense_family.json")
    assert cas_study.markdown(record) == (cas / "README.md").read_text()
    assert cas_study.family_markdown(family) == (cas / "results" / "defense_family.md").read_text()
    # the headline table reads the claims' and both retrofit studies' results from their own folders
    table = cas_study.headline_table(argparse.Namespace(results_dir=str(cas_study.RESULTS)), record, family)
    assert table == (cas / "results" / "channel_defenses_table.md").read_text()
    assert "retrofit of a standard-trained base" in table and "retrofit of robust resnet4b" in table
    # the README shows the generated table less the rows the one-commit reruns (studies/channel_defenses) replaced,
    # every row it keeps exactly as written and in order
    readme = (ROOT / "README.md").read_text().splitlines()
    header = table.splitlines()[0]
    start = readme.index(header)
    shown = []
    for line in readme[start:]:
        if not line.startswith("|"):
            break
        shown.append(line)
    written = table.strip().splitlines()
    assert shown == [line for line in written if line in shown]  # a subsequence: no hand-made row, same order
    dropped = [line.split(" | ")[0] + " | " + line.split(" | ")[1] for line in written if line not in shown]
    assert dropped == ["| CAS | AT (runs of two code versions, see below)", "| CIFS | AT", "| FSR | AT"]

    standard = STUDIES / "retrofit_standard"
    assert retrofit_standard.markdown(_json(standard / "results" / "retrofit_standard.json"),
                                      retrofit_standard.base_record()) == (standard / "README.md").read_text()

    head = STUDIES / "retrofit_study" / "results"
    out = _json(head / "retrofit_head.json")
    args = argparse.Namespace(name="retrofit_head", arms=out["setup"]["arms"], epochs=out["setup"]["epochs"],
                              runs_dir="outputs/retrofit_head", aa_examples=0, aa_seeds=None)
    text = retrofit._markdown(args, out, head, head / "retrofit_head.png")
    assert (head / "retrofit_head.md").read_text().startswith(text)  # the hand-written reading follows


def test_paper_claims_report_and_command_lines(studies_importable):
    from studies.paper_claims import study as claims
    text = claims.markdown(_json(claims.RESULTS / "paper_claims_verdicts.json"))
    committed = (STUDIES / "paper_claims" / "README.md").read_text()
    # every generated line is in the committed report, in order (a hand-written paragraph was added after its run)
    lines = iter(committed.splitlines())
    assert all(any(line == have for have in lines) for line in text.splitlines())
    assert "python -m studies.paper_claims.study" in text


def test_no_study_left_in_benchmarks_and_no_path_edits():
    left = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} & {"paper_claims", "cas_study", "retrofit_study",
                                                                   "retrofit_standard", "standard_base",
                                                                   "eval_strength", "reproduce_gpu"}
    assert not left, f"study scripts still in benchmarks/: {sorted(left)}"
    for name in MOVED:
        assert (STUDIES / name / "study.py").exists() and (STUDIES / name / "README.md").exists(), name
    for script in STUDIES.rglob("*.py"):
        text = script.read_text()
        assert "sys.path" not in text, f"{script.relative_to(ROOT)} edits sys.path: import studies as packages"
        assert "benchmarks/results" not in text, f"{script.relative_to(ROOT)} still writes to benchmarks/results"


def test_every_relative_link_in_studies_and_benchmarks_resolves():
    pages = [*STUDIES.rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")]
    assert len(pages) > 10
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            assert (page.parent / path).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


@pytest.mark.parametrize("name", ["channel_defenses", "lite0_cifar10"])
def test_queue_studies_build_their_data_on_a_small_cifar_folder(studies_importable, tmp_path, monkeypatch, name):
    """What a worker calls first (datasets, test set) runs against the package as it is now: a study script whose
    import broke in a refactor fails here, not hours into a run on a machine with the real data."""
    import importlib

    import numpy as np
    rng = np.random.default_rng(0)
    for file, n in (("train.npz", 120), ("test846.npz", 8)):
        np.savez(tmp_path / file, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, n).astype(np.int64))
    study = importlib.import_module(f"studies.{name}.study")
    monkeypatch.setitem(study.PROTOCOL, "val_start", 100)
    monkeypatch.setitem(study.PROTOCOL, "val_size", 20)
    monkeypatch.setitem(study.PROTOCOL, "train_images", 100)
    train, val = study.datasets(tmp_path)
    test = study.test_set(tmp_path)
    size = study.PROTOCOL.get("image_size", 32)
    assert (len(train), len(val), len(test)) == (100, 20, 8)
    for dataset in (train, val, test):
        x, y = dataset[0]
        assert tuple(x.shape) == (3, size, size) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_lite0_runs_share_their_seeds_natural_base(studies_importable, tmp_path, monkeypatch):
    """The Lite0 study's two phases on a tiny generated ImageNet-like checkpoint: the seed's natural base is trained
    once (its record and weights in natural_s<seed>/, copied into each run), and every arm of the seed starts from
    exactly those weights, with its defense on top."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    from studies._protocol import Arm
    from studies._records import read_json, sha256
    from studies.lite0_cifar10 import study as lite0
    torch.manual_seed(1)
    ckpt = tmp_path / "in1k.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()
               if not k.endswith("num_batches_tracked")}, str(ckpt))
    for key, value in {"arch": "test_efficientnet", "image_size": 32, "natural_steps": 3, "batch_size": 8,
                       "val_size": 8, "val_attack_steps": 1}.items():
        monkeypatch.setitem(lite0.PROTOCOL, key, value)
    monkeypatch.setattr(lite0, "WEIGHTS_SHA256", sha256(ckpt))
    g = torch.Generator().manual_seed(0)
    data = (torch.utils.data.TensorDataset(torch.rand(24, 3, 32, 32, generator=g), torch.arange(24) % 10),
            torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 10))
    runs = tmp_path / "runs"
    out = runs / "at_cas_s0"
    out.mkdir(parents=True)
    arm = Arm("at", "cas", ["blocks.1"])
    lite0.prepare("at_cas", arm, 0, out, data, str(ckpt), runs)
    record = read_json(out / "natural_base.json")
    assert record["steps"] == 3 and record["imagenet_sha256"] == sha256(ckpt)
    assert record == read_json(runs / "natural_s0" / "natural_base.json")
    natural = load_file(str(runs / "natural_s0" / "base.safetensors"))
    assert record["base_sha256"] == sha256(runs / "natural_s0" / "base.safetensors")
    model = lite0.build_model(arm, 0, str(ckpt), runs)
    own = model.state_dict()
    from casify.defenses import find_defense_modules
    assert find_defense_modules(model) and all(torch.equal(own[k], v) for k, v in natural.items())
    assert not torch.equal(natural["classifier.weight"], lite0.imagenet_base(str(ckpt)).classifier.weight)
    monkeypatch.setattr(lite0, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="not the study's ImageNet weights"):
        lite0.build_model(arm, 0, str(ckpt), runs)


def test_a_paused_study_takes_no_run_until_amended(studies_importable):
    from studies.lite0_cifar10 import study as lite0
    with pytest.raises(SystemExit, match="paused"):
        lite0.check_not_paused({"paused": {"why": "under-trains"}})
    lite0.check_not_paused({"paused": {"why": "under-trains"}, "amendments": [{"protocol": {}}]})
    lite0.check_not_paused(None)
    committed = _json(STUDIES / "lite0_cifar10" / "results" / "study.json")
    with pytest.raises(SystemExit):  # today's committed record: paused, no amendment
        lite0.check_not_paused(committed)


def test_the_budget_pilot_compares_arms_of_one_budget_on_held_out_data_only(studies_importable, tmp_path,
                                                                           monkeypatch):
    """channel_defenses' budget pilot: a longer budget keeps the study's lr drops at the same fractions, trains the
    study's own arms, never reads the test set, and reports each defended arm's held-out natural gap to AT of the
    same seed and budget."""
    import numpy as np

    from studies.channel_defenses import budget_pilot
    from studies.channel_defenses import study as channel
    assert budget_pilot.milestones(12) == tuple(channel.PROTOCOL["milestones"])
    assert budget_pilot.milestones(24) == (18, 22) and budget_pilot.milestones(18) == (13.5, 16.5)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 60).astype(np.int64))
    for key, value in {"train_images": 40, "val_start": 40, "val_size": 16, "batch_size": 20,
                       "val_attack_steps": 1}.items():
        monkeypatch.setitem(channel.PROTOCOL, key, value)

    def no_test_set(*_):
        raise AssertionError("the pilot read the test set")
    monkeypatch.setattr(channel, "test_set", no_test_set)
    runs = tmp_path / "runs"
    budget_pilot.main(["--jobs", "at:0", "at_fsr:0", "--epochs", "2", "--data-dir", str(tmp_path),
                       "--runs-dir", str(runs)])
    record = budget_pilot.report(runs, tmp_path / "no_archive")
    by_arm = {r["arm"]: r for r in record["runs"]}
    assert set(by_arm) == {"at", "at_fsr"} and all(r["epochs"] == 2 and r["milestones"] == [1.5, 11 / 6]
                                                   and r["source"] == "pilot" for r in by_arm.values())
    assert all(len(r["held_out_natural"]) == 2 and r["held_out_images"] == 16 for r in by_arm.values())
    gap = by_arm["at_fsr"]["final_natural"] - by_arm["at"]["final_natural"]
    commit = by_arm["at"]["commit"] or "untracked"
    assert record["natural_gap_to_at"] == {f"e2 at {commit[:10]} (pilot)": {"at_fsr_s0": round(gap, 4)}}
    with pytest.raises(SystemExit):
        budget_pilot.main(["--jobs", "fsr:0", "--runs-dir", str(runs)])
