"""Regenerating every A of a Llama-2-7B-shaped adapter: asymlora vs torch.

Shapes: 32 layers x (q, k, v, o, gate, up: 16 x 4096; down: 16 x 11008), r = 16.
asymlora: ``random_orthogonal_many`` (Gaussian from ChaCha12, Householder QR in
float64, bit-reproducible). torch: ``torch.randn`` + ``torch.linalg.qr`` + sign fix
per matrix, as a user would write it, in float32 (torch's default) and float64.
Same thread count for both. Prints the median of ``--repeats`` runs and ratios.

    python benches/bench_regenerate.py [--threads N] [--repeats 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time

import numpy as np

import asymlora
from asymlora.generator_check import llama2_7b_modules


def _shapes_and_streams() -> tuple[list[tuple[int, int]], list[int]]:
    modules = llama2_7b_modules()
    return [(16, m.d_in) for m in modules.values()], [m.stream for m in modules.values()]


def time_asymlora(shapes, streams, threads: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = asymlora.random_orthogonal_many(shapes, seed=0, streams=streams, threads=threads)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in out)).hexdigest()
    return seconds, digest


def time_torch(shapes, dtype) -> float:
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    for r, d_in in shapes:
        g = torch.randn(d_in, r, dtype=dtype)
        q, rr = torch.linalg.qr(g)
        signs = torch.where(torch.diagonal(rr) >= 0, 1.0, -1.0).to(dtype)
        a = (q * signs).T.contiguous().to(torch.float32)
    del a
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    shapes, streams = _shapes_and_streams()
    n_values = sum(r * d for r, d in shapes)

    time_asymlora(shapes, streams, args.threads)  # warm-up (thread pool, page faults)
    time_torch(shapes[:8], torch.float32)
    runs: dict[str, list[float]] = {"asymlora": [], "torch float32": [], "torch float64": []}
    digests = set()
    for _ in range(args.repeats):  # interleaved, so machine noise hits all alike
        seconds, digest = time_asymlora(shapes, streams, args.threads)
        runs["asymlora"].append(seconds)
        digests.add(digest)
        runs["torch float32"].append(time_torch(shapes, torch.float32))
        runs["torch float64"].append(time_torch(shapes, torch.float64))

    reference = statistics.median(runs["torch float32"])
    print(f"regenerate {len(shapes)} A factors ({n_values / 1e6:.1f} M values), Llama-2-7B, r=16")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, "
        f"torch {torch.__version__}, asymlora {asymlora.__version__}, median of {args.repeats}"
    )
    print()
    print(f"{'method':<16} {'median s':>9} {'min s':>7} {'max s':>7} {'vs torch f32':>13}")
    for name, times in runs.items():
        med = statistics.median(times)
        spread = f"{min(times):>7.3f} {max(times):>7.3f}"
        print(f"{name:<16} {med:>9.3f} {spread} {med / reference:>12.2f}x")
    print()
    digest = next(iter(digests))[:16]
    print(f"asymlora bits identical across runs: {len(digests) == 1} (sha256 {digest}...)")


if __name__ == "__main__":
    main()
