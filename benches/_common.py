"""Pieces the benchmark scripts share: a Llama built from a config, RSS readings and the
table formatting. Imported by the scripts as ``_common`` (they run with benches/ on
sys.path[0])."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def llama_from_config(torch, device, dtype, args, *, max_positions: int, **config):
    """``LlamaForCausalLM`` of ``args`` (vocab, hidden, intermediate, layers), random
    weights from ``torch.manual_seed(0)``, built directly in ``dtype`` on ``device`` (no
    float32 copy inflating the peak), every parameter frozen. ``config``: further
    ``LlamaConfig`` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **config,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc), or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kB on Linux


def quartiles(values: list[float], method: str = "exclusive") -> list[float]:
    """First and third quartile (``statistics.quantiles``' method); the value itself for one."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method=method)
    return [q[0], q[2]]


def mib(n: float | None, digits: int = 1) -> str:
    return "-" if n is None else f"{n / 2**20:.{digits}f}"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_step_arguments(parser: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    """The options of a training-step benchmark that runs each method in its own worker
    process: rank, timed and warm-up steps, interleaved rounds, threads, device, methods,
    ``--quick``, ``--out`` and the hidden ``--worker``."""
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def run_worker(script: str, method: str, options: list[str]):
    """Runs ``script --worker METHOD OPTIONS`` in a fresh process (offline) and returns
    the JSON of its last output line; stops the benchmark with its output on failure."""
    argv = [sys.executable, script, "--worker", method, *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {method} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_step_result(args: argparse.Namespace, **fields) -> None:
    """Writes a step benchmark's results to ``args.out`` (when given): its arguments,
    ``fields``, the machine and the time."""
    if not args.out:
        return
    result = {
        "args": vars(args) | {"out": str(args.out)},
        **fields,
        "machine": platform.platform(),
        "when": datetime.now(timezone.utc).isoformat(),
    }
    args.out.write_text(json.dumps(result, indent=2))
