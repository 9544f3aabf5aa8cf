"""The pinned haar-v1 outputs in docs/haar-v1-test-vectors.json and haar-v1-f64-vectors.json.

A failure here means the generator changed: that is a new generator, never a fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import asymlora

VECTORS_PATH = Path(__file__).parents[1] / "docs" / "haar-v1-test-vectors.json"
VECTORS = json.loads(VECTORS_PATH.read_text())
F64_VECTORS = json.loads((VECTORS_PATH.parent / "haar-v1-f64-vectors.json").read_text())
THREADS = (1, 2, 8)


def _case_id(entry: dict) -> str:
    parts = [f"r{entry['r']}", f"d{entry['d_in']}", f"seed{entry['seed']}", f"s{entry['stream']}"]
    if "dtype" in entry:
        parts.append(entry["dtype"])
    if entry.get("gain", 1.0) != 1.0:
        parts.append(f"gain{entry['gain']}")
    return "-".join(parts)


def _hex_bits(a: np.ndarray) -> list[str]:
    """IEEE-754 bit patterns of the row-major elements, as in the vectors file."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 8:
        return [f"{x:016x}" for x in a.view(np.uint64).ravel()]
    if a.dtype.itemsize == 4:
        return [f"{x:08x}" for x in a.view(np.uint32).ravel()]
    assert a.dtype.itemsize == 2, a.dtype
    return [f"{x:04x}" for x in a.view(np.uint16).ravel()]


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_vectors_file_is_haar_v1():
    assert VECTORS["generator"] == "haar-v1"
    assert VECTORS["generator"] in asymlora.GENERATORS
    assert VECTORS["gaussian"] and VECTORS["small"] and VECTORS["sha256"]


@pytest.mark.parametrize("entry", VECTORS["gaussian"], ids=_case_id)
def test_vectors_file_bits_match_values(entry):
    """The file is self-consistent: the decimal values are the pinned bit patterns."""
    for bits, value in zip(entry["values_f64_bits"], entry["values"]):
        assert struct.unpack(">d", bytes.fromhex(bits))[0] == value


@pytest.mark.parametrize("entry", VECTORS["gaussian"], ids=_case_id)
def test_gaussian_matrix_bits(entry):
    g = asymlora.gaussian_matrix(
        entry["r"], entry["d_in"], seed=entry["seed"], stream=entry["stream"]
    )
    assert g.dtype == np.float64
    assert g.shape == (entry["r"], entry["d_in"])
    assert _hex_bits(g) == entry["values_f64_bits"]


@pytest.mark.parametrize("entry", F64_VECTORS["gaussian_draws"], ids=_case_id)
def test_gaussian_rare_paths_bits(entry):
    """Rows that take the tail and wedge paths, in full binary64."""
    g = asymlora.gaussian_matrix(1, entry["d_in"], seed=entry["seed"], stream=entry["stream"])
    assert _hex_bits(g) == entry["values_f64_bits"]


@pytest.mark.parametrize("entry", F64_VECTORS["gaussian_sha256"], ids=_case_id)
def test_gaussian_matrix_sha256(entry):
    g = asymlora.gaussian_matrix(
        entry["r"], entry["d_in"], seed=entry["seed"], stream=entry["stream"]
    )
    assert _sha256(g) == entry["sha256"]


def _generate(entry: dict, threads: int) -> np.ndarray:
    """The matrix a test-vector entry describes, checked for its shape."""
    a = asymlora.random_orthogonal(
        entry["r"],
        entry["d_in"],
        seed=entry["seed"],
        stream=entry["stream"],
        dtype=entry["dtype"],
        gain=entry.get("gain", 1.0),
        threads=threads,
    )
    assert a.shape == (entry["r"], entry["d_in"])
    return a


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("entry", VECTORS["small"], ids=_case_id)
def test_small_bits(entry, threads):
    a = _generate(entry, threads)
    assert _hex_bits(a) == entry["bits"]
    np.testing.assert_array_equal(a.astype(np.float64).ravel(), np.array(entry["values"]))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("entry", F64_VECTORS["rounded"], ids=_case_id)
def test_rounded_with_gain_bits(entry, threads):
    assert _hex_bits(_generate(entry, threads)) == entry["bits"]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("entry", VECTORS["sha256"], ids=_case_id)
def test_sha256(entry, threads):
    a = _generate(entry, threads)
    assert _sha256(a) == entry["sha256"]


def _sha_groups() -> dict[tuple[str, int], list[dict]]:
    """sha256 cases grouped by (dtype, seed): ``random_orthogonal_many`` takes one seed."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for entry in VECTORS["sha256"]:
        groups[(entry["dtype"], entry["seed"])].append(entry)
    return dict(groups)


@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("dtype", sorted({e["dtype"] for e in VECTORS["sha256"]}))
def test_many_equals_golden_singles(dtype, threads):
    checked = 0
    for (group_dtype, seed), entries in _sha_groups().items():
        if group_dtype != dtype:
            continue
        many = asymlora.random_orthogonal_many(
            [(e["r"], e["d_in"]) for e in entries],
            seed=seed,
            streams=[e["stream"] for e in entries],
            dtype=dtype,
            threads=threads,
        )
        assert len(many) == len(entries)
        for a, e in zip(many, entries):
            assert a.shape == (e["r"], e["d_in"])
            assert _sha256(a) == e["sha256"], _case_id(e)
            single = asymlora.random_orthogonal(
                e["r"], e["d_in"], seed=seed, stream=e["stream"], dtype=dtype
            )
            assert single.dtype == a.dtype
            assert _hex_bits(single) == _hex_bits(a)
        checked += len(entries)
    assert checked == sum(e["dtype"] == dtype for e in VECTORS["sha256"])


def test_many_mixed_shapes_all_sha_cases_in_one_call():
    """All float32 seed-0 cases plus extra shapes in one batch, order preserved."""
    seed0 = [e for e in VECTORS["sha256"] if e["seed"] == 0 and e["dtype"] == "float32"]
    assert len(seed0) >= 2
    shapes = [(3, 7), *((e["r"], e["d_in"]) for e in seed0), (1, 1)]
    streams = [100, *(e["stream"] for e in seed0), 101]
    many = asymlora.random_orthogonal_many(shapes, seed=0, streams=streams, threads=2)
    for a, e in zip(many[1:-1], seed0):
        assert _sha256(a) == e["sha256"]
    assert _hex_bits(many[0]) == _hex_bits(asymlora.random_orthogonal(3, 7, seed=0, stream=100))
    assert _hex_bits(many[-1]) == _hex_bits(asymlora.random_orthogonal(1, 1, seed=0, stream=101))


_SUBPROCESS_SCRIPT = """
import hashlib, sys
import numpy as np
import asymlora
r, d_in, seed, stream, dtype = sys.argv[1:]
a = asymlora.random_orthogonal(int(r), int(d_in), seed=int(seed), stream=int(stream), dtype=dtype)
print(hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())
"""


def test_rayon_num_threads_env_does_not_change_bits():
    """threads=None uses rayon's default pool, sized by RAYON_NUM_THREADS."""
    entry = next(e for e in VECTORS["sha256"] if e["d_in"] == 11008)
    args = [str(entry[k]) for k in ("r", "d_in", "seed", "stream", "dtype")]
    hashes = {}
    for n in ("1", "8"):
        env = {**os.environ, "RAYON_NUM_THREADS": n}
        proc = subprocess.run(
            [sys.executable, "-c", _SUBPROCESS_SCRIPT, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        hashes[n] = proc.stdout.strip()
    assert hashes["1"] == hashes["8"] == entry["sha256"]
