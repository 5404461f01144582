"""The studies' shared protocol (studies/_protocol.py, _report.py, _archive.py, _records.py): arms of two code
versions, or of a tree with local changes, are reported and never judged; arms of one commit are judged by the crossed
rule with Holm over the family; finished runs are archived and outlive their scratch folder."""
import importlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def studies_importable():
    # the studies run as `python -m studies.<name>.study` from the repository root; plain `pytest` does not put the
    # root on the path
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield


@pytest.fixture(scope="module")
def protocol(studies_importable):
    return importlib.import_module("studies._protocol")


@pytest.fixture(scope="module")
def report(studies_importable):
    return importlib.import_module("studies._report")


@pytest.fixture(scope="module")
def archive(studies_importable):
    return importlib.import_module("studies._archive")


@pytest.fixture(scope="module")
def record_files(studies_importable):
    return importlib.import_module("studies._records")


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


def test_one_commit_is_judged_with_holm(report):
    comparisons = {"cas": report.comparison(_runs(), "at_cas", "at"),
                   "same": report.comparison(_runs(), "at", "at")}
    judged = report.judge(comparisons)
    assert judged["cas"]["verdict"] == "A worse" and judged["cas"]["p_holm"] >= judged["cas"]["p"]
    assert judged["same"]["verdict"] == "inconclusive" and "_result" not in judged["cas"]


@pytest.mark.parametrize("runs, reason", [
    (_runs(commit_of=lambda arm, seed: ("a" if arm == "at" else "b") * 40), "different code"),
    (_runs(commit_of=lambda arm, seed: None), "different code"),
    (_runs(dirty=True), "local changes"),
    (_runs(seeds=(0, 1)), "the rule needs 3")])
def test_mixed_code_or_too_few_seeds_are_never_judged(report, runs, reason):
    out = report.judge({"cas": report.comparison(runs, "at_cas", "at")})["cas"]
    assert out["verdict"].startswith("not judged") and reason in out["verdict"] and "p_holm" not in out


def _finished_run(record_files, out: Path, seed: int) -> str:
    """A run folder as a worker leaves it: run config, training record, scores, the selected model."""
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(f"weights of seed {seed}".encode())
    (out / "final" / "config.json").write_text("{}")
    sha = record_files.sha256(out / "final" / "model.safetensors")
    code = {"commit": "c" * 40, "dirty": False, "casify_version": "0"}
    flags = [bool((i + seed) % 3) for i in range(30)]
    record_files.write_json(out / "run_config.json", {"code": code, "code_history": [code]})
    record_files.write_json(out / "train_record.json", {"seconds": 10.0, "steps": 5, "history": [], "code": code})
    record_files.write_json(out / "score.json", {
        "natural": 0.9, "worst_case": sum(flags) / 30, "n": 30, "gradient_masking_suspected": False,
        "failed_checks": [], "families": {}, "code": code, "model_sha256": sha, "seconds": 3.0,
        "per_example": {"worst_case": flags, "natural": [True] * 30}})
    record_files.write_json(out / "matched.json", {"worst_case": 0.5, "per_example": flags, "seconds": 1.0})
    return sha


def test_finished_runs_are_archived_and_outlive_their_scratch_folder(protocol, archive, record_files, tmp_path):
    """A machine's scratch folder is gone by the next session: the archive (committed) is what a later worker skips
    and what the report reads; seed 0's model is archived with it and checked against the scored SHA-256."""
    study = protocol.Study(name="toy", arms={"at": protocol.Arm()}, schedule=[("at", 0), ("at", 1)],
                           build_model=None, datasets=None, test_set=None, train_config=None,
                           extras={"matched.json": lambda arm, seed: True})
    scratch, records = tmp_path / "scratch", tmp_path / "studies" / "toy"
    shas = {s: _finished_run(record_files, scratch / f"at_s{s}", s) for s in (0, 1)}
    before = archive.collect(study, scratch)
    for seed in (0, 1):
        archive.archive_run(study, scratch, records, "at", seed)
    assert "\n" not in (records / "runs" / "at_s0" / "score.json").read_text()  # compact
    assert record_files.sha256(records / "models" / "at_s0" / "model.safetensors") == shas[0]
    assert not (records / "models" / "at_s1").exists()  # only seed 0's model is committed
    import shutil
    shutil.rmtree(scratch)
    after = archive.collect(study, scratch, records)
    assert after.keys() == before.keys() and all(after[k]["_flags"] == before[k]["_flags"] for k in before)
    assert after[("at", 1)]["commits"] == ["c" * 40] and study.done(scratch, "at", 1, records)
    protocol.work(study, scratch, records=records)  # nothing left to do: no claim, no error, no training
    assert not scratch.exists()
    assert archive.copy_selected_models(study, scratch, [("at", 0)], records / "models",
                                        expected={"at_s0": shas[0]}) == {"at_s0": shas[0]}
    with pytest.raises(SystemExit, match="not the scored model"):
        archive.copy_selected_models(study, scratch, [("at", 0)], records / "models", expected={"at_s0": "0" * 64})


def test_too_few_seeds_still_report_each_metrics_per_seed_differences(report):
    runs = _runs(seeds=(0, 1))
    for run in runs.values():
        run["_flags"]["matched"] = run["_flags"]["worst_case"]
        run["matched_worst_case"] = run["natural"] = run["worst_case"]
    for metric in ("worst_case", "matched", "natural"):
        out = report.comparison(runs, "at_cas", "at", metric)
        assert "the rule needs 3" in out["verdict"] and len(out["per_seed_diff"]) == 2


def test_a_worker_archives_runs_finished_before_it_started(protocol, archive, record_files, tmp_path):
    """A run that finished in the scratch folder but was never archived (its worker was stopped in between) is
    archived by the next worker, not trained again."""
    study = protocol.Study(name="toy", arms={"at": protocol.Arm()}, schedule=[("at", 0)], build_model=None,
                           datasets=None, test_set=None, train_config=None)
    scratch, records = tmp_path / "scratch", tmp_path / "studies" / "toy"
    _finished_run(record_files, scratch / "at_s0", 0)
    protocol.work(study, scratch, records=records)
    assert study.complete(archive.archived(records, "at", 0), "at", 0)
    assert not (scratch / "at_s0" / "error.json").exists() and not (scratch / "at_s0" / ".claim").exists()


def test_archived_run_records_are_not_ignored_by_git():
    """The archive exists to be committed: .gitignore's scratch patterns (runs/, outputs/) must not swallow it."""
    import shutil
    import subprocess
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("studies/some_study/runs/at_s0/score.json", "studies/some_study/models/at_s0/model.safetensors"):
        done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
        assert done.returncode == 1, f"{path} is ignored by git"
