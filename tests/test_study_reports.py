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
    assert table.strip() in (ROOT / "README.md").read_text()

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
