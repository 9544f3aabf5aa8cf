"""benches/bench_moe.py at its smallest: it runs, prints its table and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_moe.py"


@pytest.mark.slow
def test_quick_run_prints_the_table(tmp_path):
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("none", "asymlora-B", "peft-lora"):
        assert f"\n{row} " in proc.stdout, proc.stdout
    assert "asymlora-B overhead / PEFT overhead:" in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    ours, peft = summary["asymlora-B"], summary["peft-lora"]
    assert summary["none"]["trainable_params"] == 0
    # B only: per expert d_out x r, against PEFT's A and B
    assert 0 < ours["trainable_params"] < peft["trainable_params"]
