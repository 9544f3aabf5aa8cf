"""benches/bench_train.py at its smallest on a 4-bit base (QLoRA): it runs, prints its
table and targets, and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_train.py"


@pytest.mark.slow
def test_quick_qlora_run_prints_the_table_and_the_targets(tmp_path):
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCH), "--quick", "--base", "nf4", "--threads", "1"]
    argv += ["--methods", "none,asymlora-B,peft-lora", "--paired-steps", "0", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "base nf4" in text
    for row in ("none", "asymlora-B", "peft-lora"):
        assert f"\n{row} " in text, text
    assert "target: step overhead <= 1.0x PEFT's (per-process medians)" in text
    assert "target: adapter file <= 0.55x PEFT's: met" in text, text
    result = json.loads(out.read_text())
    assert result["args"]["base"] == "nf4"
    ours, peft = result["summary"]["asymlora-B"], result["summary"]["peft-lora"]
    assert ours["trainable_params"] * 2 > peft["trainable_params"] > ours["trainable_params"]
    assert ours["saved_bytes"] < peft["saved_bytes"]  # x A^T instead of x for A's gradient
