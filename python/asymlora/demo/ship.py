"""Ship the B-only adapter as a user would: merge offline, reload with plain transformers.

Both steps run in child processes: the merge through the ``asymlora`` console
command, the reload in a Python that never imports asymlora, so the merged
checkpoint is shown to stand on its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asymlora.demo.data import Review
from asymlora.demo.model import predicted_class

# Runs in a fresh interpreter: transformers and torch only. Reads the test texts,
# writes the merged model's logits, and proves asymlora was never imported.
_PLAIN_TRANSFORMERS = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

checkpoint, texts_file, out_file, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
texts = json.load(open(texts_file, encoding="utf-8"))
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
assert len(tokenizer) > 1000, "the merged checkpoint has no usable tokenizer"
model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
logits = []
with torch.inference_mode():
    for start in range(0, len(texts), 128):
        batch = tokenizer(texts[start:start + 128], truncation=True, max_length=64,
                          padding=True, return_tensors="pt")
        logits += model(**batch).logits.float().tolist()
assert not any(name.split(".")[0] == "asymlora" for name in sys.modules), "asymlora was imported"
json.dump(logits, open(out_file, "w"))
"""


@dataclass
class ShipResult:
    """The merged checkpoint and how its predictions compare with the adapter model's."""

    merged: str
    merge_seconds: float
    merged_bytes: int
    predictions_equal: int
    predictions_total: int
    max_logit_difference: float

    @property
    def ok(self) -> bool:
        """Every prediction of the merged model equals the adapter model's."""
        return self.predictions_equal == self.predictions_total


class ShipError(RuntimeError):
    """A step of shipping the adapter failed; the message carries the step's output."""


def merge_and_reload(
    base: Path,
    adapter: Path,
    out: Path,
    test: list[Review],
    adapter_logits: list[list[float]],
    threads: int,
) -> ShipResult:
    """``asymlora merge BASE ADAPTER -o OUT``, then plain-transformers logits on ``test``."""
    merged = out / "merged"
    if merged.exists():
        shutil.rmtree(merged)
    start = time.perf_counter()
    _check_call(
        [
            _asymlora_command(),
            "merge",
            str(base),
            str(adapter),
            "-o",
            str(merged),
            "--quiet",
            "--threads",
            str(threads),
        ],
        "asymlora merge",
    )
    seconds = time.perf_counter() - start
    merged_logits = _plain_transformers_logits(merged, test, out, threads)
    diffs = [max(abs(a - b) for a, b in zip(x, y)) for x, y in zip(adapter_logits, merged_logits)]
    same = sum(
        predicted_class(x) == predicted_class(y) for x, y in zip(adapter_logits, merged_logits)
    )
    return ShipResult(
        merged=str(merged),
        merge_seconds=seconds,
        merged_bytes=sum(f.stat().st_size for f in merged.glob("*.safetensors")),
        predictions_equal=same,
        predictions_total=len(test),
        max_logit_difference=max(diffs),
    )


def _plain_transformers_logits(
    checkpoint: Path, test: list[Review], out: Path, threads: int
) -> list[list[float]]:
    texts, logits = out / "test-texts.json", out / "merged-logits.json"
    texts.write_text(json.dumps([r.text for r in test]), encoding="utf-8")
    env_python = [sys.executable, "-c", _PLAIN_TRANSFORMERS]
    _check_call(
        [*env_python, str(checkpoint), str(texts), str(logits), str(threads)],
        "reloading the merged checkpoint with plain transformers",
    )
    result = json.loads(logits.read_text())
    texts.unlink()
    logits.unlink()
    return result


def _asymlora_command() -> str:
    # The console script installed next to this interpreter; the same program a user runs.
    script = Path(sys.executable).parent / "asymlora"
    found = script if script.exists() else shutil.which("asymlora")
    if found is None:
        raise ShipError("the `asymlora` command is not installed next to this Python")
    return str(found)


def _check_call(command: list[str], what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ShipError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
