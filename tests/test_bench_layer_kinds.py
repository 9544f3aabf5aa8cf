"""benches/bench_layer_kinds.py at its smallest: it runs, prints its table and writes its
JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benches" / "bench_layer_kinds.py"
KEYS = {"row", "dropout", "method", "saved_bytes", "trainable_params", "optimizer_bytes"}
KEYS |= {"file_bytes", "step_s", "min_s", "max_s", "overhead_s"}


@pytest.mark.slow
def test_quick_run_prints_the_table(tmp_path):
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "row        dropout method      saved MiB  trainable AdamW MiB" in proc.stdout
    for row in ("conv2d", "conv1d", "conv3d", "embedding"):
        for method in ("none", "asymlora-B", "peft-lora"):
            assert f"\n{row} " in proc.stdout and f" {method} " in proc.stdout, proc.stdout
    assert "asymlora-B / PEFT:" in proc.stdout
    result = json.loads(out.read_text())
    assert all(set(r) == KEYS for r in result["summary"]), result["summary"]
    assert len(result["summary"]) == 3 * (1 + 2 * 2) + 3  # convs: dropout 0.0 and 0.1
    find = {(r["row"], r["dropout"], r["method"]): r for r in result["summary"]}
    for (row, dropout, method), ours in find.items():
        if method == "none":
            assert ours["trainable_params"] == 0 and ours["file_bytes"] is None
        if method != "asymlora-B":
            continue
        peft = find[(row, dropout, "peft-lora")]
        # B only, A 8 bytes of seed in the file: against PEFT's A and B
        assert 0 < ours["trainable_params"] < peft["trainable_params"]
        assert ours["file_bytes"] < peft["file_bytes"]
        assert ours["optimizer_bytes"] == 8 * ours["trainable_params"]
        if dropout:  # x A^T kept instead of the dropped-out input
            assert ours["saved_bytes"] < peft["saved_bytes"]
    assert {r["row"] for r in result["ratios"]} == {"conv2d", "conv1d", "conv3d", "embedding"}
