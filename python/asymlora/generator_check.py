"""``asymlora generator-check``: the generator and format, checked at Llama-2-7B scale.

Builds a seed-plus-B adapter for every linear module of a Llama-2-7B-shaped model
(32 layers; q, k, v, o 4096->4096; gate, up 4096->11008; down 11008->4096; r=16),
writes it, reads it back, regenerates every ``A`` from the seed, and checks that
each ``A`` has orthonormal rows and the same bits with 1 thread and with all
cores (and, for the default seed, the pinned golden hashes). Prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asymlora.adapter import AdapterConfig, ModuleConfig, read_adapter, write_adapter
from asymlora.orthogonal import random_orthogonal_many

HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
#: (module suffix, d_in, d_out) of one Llama-2-7B decoder layer
LLAMA2_7B_LINEARS = (
    ("self_attn.q_proj", HIDDEN, HIDDEN),
    ("self_attn.k_proj", HIDDEN, HIDDEN),
    ("self_attn.v_proj", HIDDEN, HIDDEN),
    ("self_attn.o_proj", HIDDEN, HIDDEN),
    ("mlp.gate_proj", HIDDEN, INTERMEDIATE),
    ("mlp.up_proj", HIDDEN, INTERMEDIATE),
    ("mlp.down_proj", INTERMEDIATE, HIDDEN),
)
#: SHA-256 of the float32 little-endian bytes of A for seed 0, rank 16 (pinned in tests too)
GOLDEN_SEED0 = {
    (0, 4096): "69f946995958bfc2af8880379a9b7a9ee29a1d2fb70da4d2c677d6c7aff25ad2",
    (6, 11008): "01a8797cce6043c4a816dfbee8fe5e88184710b47e3b1022702456e96a212c9a",
}
ORTHONORMALITY_TOLERANCE = 2e-6


def llama2_7b_modules(layers: int = LAYERS) -> dict[str, ModuleConfig]:
    """Module table of a Llama-2-7B-shaped adapter, streams numbered in order."""
    modules = {}
    for layer in range(layers):
        for suffix, d_in, d_out in LLAMA2_7B_LINEARS:
            modules[f"model.layers.{layer}.{suffix}"] = ModuleConfig(
                d_in=d_in, d_out=d_out, stream=len(modules)
            )
    return modules


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _orthonormality_error(a: np.ndarray) -> float:
    a64 = a.astype(np.float64)
    return float(np.abs(a64 @ a64.T - np.eye(a.shape[0])).max())


def build_adapter(path: Path, *, rank: int, seed: int, layers: int) -> AdapterConfig:
    """Writes an example adapter whose B's stand in for trained ones."""
    modules = llama2_7b_modules(layers)
    config = AdapterConfig(rank=rank, alpha=2.0 * rank, seed=seed, modules=modules)
    rng = np.random.default_rng(seed)
    tensors = {
        f"{name}.lora_B": (0.01 * rng.standard_normal((m.d_out, rank))).astype(np.float32)
        for name, m in modules.items()
    }
    write_adapter(path, config, tensors)
    return config


def run(out: Path, *, rank: int, seed: int, layers: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "llama2-7b-seed-plus-b.safetensors"
    print(f"building a Llama-2-7B-shaped adapter (r={rank}, seed={seed}, {layers} layers) ...")
    build_adapter(path, rank=rank, seed=seed, layers=layers)

    adapter = read_adapter(path)
    names = sorted(adapter.modules, key=lambda n: adapter.config.modules[n].stream)
    shapes = [(adapter.config.module_rank(n), adapter.config.modules[n].d_in) for n in names]
    streams = [adapter.config.modules[n].stream for n in names]
    cores = os.cpu_count() or 1

    print(f"regenerating {len(names)} A factors from the seed ({cores} threads) ...")
    t0 = time.perf_counter()
    many = random_orthogonal_many(shapes, seed=seed, streams=streams)
    seconds_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = random_orthogonal_many(shapes, seed=seed, streams=streams, threads=1)
    seconds_one = time.perf_counter() - t0

    rows: dict[str, dict] = {}
    for name, a_many, a_one in zip(names, many, single):
        kind = name.rsplit(".", 1)[-1]
        row = rows.setdefault(
            kind,
            {
                "count": 0,
                "shape": list(a_many.shape),
                "max_orth_err": 0.0,
                "threads_agree": True,
                "file_agrees": True,
                "golden": "n/a",
            },
        )
        row["count"] += 1
        row["max_orth_err"] = max(row["max_orth_err"], _orthonormality_error(a_many))
        row["threads_agree"] &= _sha256(a_many) == _sha256(a_one)
        golden = GOLDEN_SEED0.get((adapter.config.modules[name].stream, a_many.shape[1]))
        if seed == 0 and rank == 16 and golden is not None:
            ok = _sha256(a_many) == golden
            row["golden"] = "ok" if ok and row["golden"] != "MISMATCH" else "MISMATCH"
    # the A the file implies (read path) must equal the batch result, for a sample
    for name in names[:: max(1, len(names) // 16)]:
        same = _sha256(adapter.lora_A(name)) == _sha256(many[names.index(name)])
        rows[name.rsplit(".", 1)[-1]]["file_agrees"] &= same

    report = {
        "adapter": str(path),
        "modules": len(names),
        "rank": rank,
        "seed": seed,
        "file_bytes": adapter.file_size,
        "classic_lora_bytes": adapter.classic_lora_size,
        "regenerate_seconds_all_threads": seconds_all,
        "regenerate_seconds_one_thread": seconds_one,
        "threads": cores,
        "rows": rows,
    }
    report["ok"] = all(
        r["max_orth_err"] <= ORTHONORMALITY_TOLERANCE
        and r["threads_agree"]
        and r["file_agrees"]
        and r["golden"] != "MISMATCH"
        for r in rows.values()
    )
    (out / "generator-check.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(report: dict) -> None:
    header = (
        f"{'module':<10} {'count':>5} {'A shape':>12}  {'max|AA^T-I|':>11}  "
        f"{'1 vs N threads':<14} {'file':<5} golden"
    )
    print()
    print(header)
    print("-" * len(header))
    for kind, r in report["rows"].items():
        shape = f"{r['shape'][0]} x {r['shape'][1]}"
        print(
            f"{kind:<10} {r['count']:>5} {shape:>12}  {r['max_orth_err']:>11.2e}  "
            f"{'same bits' if r['threads_agree'] else 'DIFFERENT':<14} "
            f"{'same' if r['file_agrees'] else 'DIFF':<5} {r['golden']}"
        )
    file_mib = report["file_bytes"] / 2**20
    lora_mib = report["classic_lora_bytes"] / 2**20
    t_all = report["regenerate_seconds_all_threads"]
    t_one = report["regenerate_seconds_one_thread"]
    print()
    print(f"adapter file      {file_mib:8.1f} MiB  (B only + seed)")
    print(f"as classic LoRA   {lora_mib:8.1f} MiB  (A stored too): ratio {file_mib / lora_mib:.3f}")
    print(f"regenerate all A  {t_all:8.3f} s on {report['threads']} threads, {t_one:.3f} s on 1")
    print(f"result            {'OK' if report['ok'] else 'FAILED'}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asymlora generator-check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("asymlora-generator-check"),
        help="output directory (default: ./asymlora-generator-check)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="adapter seed (default: 0)")
    parser.add_argument(
        "--rank", type=_positive_int, default=16, help="LoRA rank, at most 4096 (default: 16)"
    )
    parser.add_argument(
        "--layers", type=_positive_int, default=LAYERS, help="decoder layers (default: 32)"
    )
    args = parser.parse_args(argv)
    if args.rank > HIDDEN:
        parser.error(f"argument --rank: at most {HIDDEN} (the smallest d_in), got {args.rank}")
    report = run(args.out, rank=args.rank, seed=args.seed, layers=args.layers)
    return 0 if report["ok"] else 1
