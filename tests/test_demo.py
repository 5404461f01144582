"""``make demo`` end to end at a toy budget: numbered steps, an honest reading of its own table, a loadable card."""
import re

import casify
from casify import demo


def test_demo_numbers_its_steps_reads_its_table_honestly_and_its_model_loads(tmp_path, capsys, one_thread):
    summary = demo.main(["--out", str(tmp_path), "--epochs", "0.05", "--pretrain-epochs", "0.05", "--width", "0.125",
                         "--max-examples", "16"])
    out = capsys.readouterr().out
    steps = re.findall(r"^\[(\d)/5\]", out, flags=re.M)
    assert sorted(set(steps)) == ["1", "2", "3", "4", "5"] and steps == sorted(steps)
    reading = out.split("How to read this table:", 1)[1]
    assert "one seed" in reading and "not whether CAS helps" in reading and demo.EVIDENCE in reading
    gap = 100 * (summary["results"]["AT+CAS"]["accuracy"]["worst_case"]
                 - summary["results"]["AT"]["accuracy"]["worst_case"])
    assert f"{gap:+.1f} points" in reading
    card = (tmp_path / "at_cas_robust_model" / "README.md").read_text()
    line = re.search(r"casify\.from_pretrained\((.+?)\)\.eval\(\)", card).group(1)
    assert casify.from_pretrained(eval(line)).cas_layers == demo.CAS_LAYERS
