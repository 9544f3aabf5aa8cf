"""benches/bench_multi_adapter.py at its smallest: it runs, prints its tables and targets,
writes its JSON, and asymlora's mixed batches agree with PEFT's in that same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_multi_adapter.py"


@pytest.mark.slow
def test_quick_run_prints_the_table_and_agrees_with_peft(tmp_path):
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--threads", "1"]
    argv += ["--adapters", "4", "--ks", "1,4", "--batch", "4", "--json", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for row in ("none", "merged", "asymlora K=1", "peft K=1", "asymlora K=4", "peft K=4"):
        assert f"\n{row} " in text, text
    assert "forward (prefill) of 4 x 16 tokens" in text
    assert "greedy generate of 3 new tokens" in text
    assert text.count(": passed -- asymlora vs PEFT logits") == 2, text  # both checks
    assert "target: bytes per added adapter <= 0.55x PEFT's: met" in text, text
    assert text.count("target: ") == 5  # two per workload, one for memory

    result = json.loads(out.read_text())
    assert result["benchmark"] == "multi_adapter"
    rows = result["correctness"]["forward"]["rows"]
    assert {"asymlora K=1", "asymlora K=4", "merged"} <= set(rows)
    assert all(r["ok"] for r in rows.values())
    # the adapters change the logits, so agreeing with PEFT is not trivially true
    assert rows["asymlora K=4"]["max_abs_effect_vs_none"] > 1e-3
    generated = result["correctness"]["generate"]["rows"]
    assert generated["asymlora K=4"]["tokens_equal_fraction"] == 1.0
    memory = result["memory"]
    assert memory["asymlora"]["adapters"] == memory["peft"]["adapters"] == 4
    assert set(result["summary"]) == {"forward", "generate"}
    for table in result["summary"].values():
        assert table["none"]["n"] == 1 and "peft K=4" in table
