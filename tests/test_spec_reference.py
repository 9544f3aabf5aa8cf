"""The spec, the vectors and an independent implementation check each other.

``haar_v1_reference`` is written from docs/generator-haar-v1.md alone (no extension). It
must reproduce every published vector (both vector files, all shapes), and each
single change of a spec choice (``MUTATIONS``) must make at least one vector fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from typing import Callable

import haar_v1_reference as ref
import numpy as np
import pytest

VECTORS = json.loads((ref.DOCS / "haar-v1-test-vectors.json").read_text())
F64_VECTORS = json.loads((ref.DOCS / "haar-v1-f64-vectors.json").read_text())
#: the FMA mutation emulates every fused operation with exact rationals: small shapes only
FMA_MAX_ENTRIES = 64


@dataclass(frozen=True)
class Vector:
    """One published vector: ``holds(choices)`` regenerates it and compares."""

    name: str
    entries: int  # r * d_in, to try cheap vectors first
    holds: Callable[[ref.Choices], bool]


def _shape(e: dict) -> str:
    return f"r{e['r']}-d{e['d_in']}-seed{e['seed']}-s{e['stream']}"


@cache
def _a_f64(r: int, d_in: int, seed: int, stream: int, gain: float, choices: ref.Choices):
    a = ref.random_orthogonal_f64(r, d_in, seed, stream, gain, choices)
    a.flags.writeable = False
    return a


@cache
def _g(r: int, d_in: int, seed: int, stream: int, choices: ref.Choices):
    g = ref.gaussian_matrix(r, d_in, seed, stream, choices)
    g.flags.writeable = False
    return g


def _rounded(e: dict, c: ref.Choices) -> np.ndarray:
    gain = e.get("gain", 1.0)
    a = _a_f64(e["r"], e["d_in"], e["seed"], e["stream"], gain, c)
    return ref.round_to_dtype(a, e["dtype"], gain, c)


def _vectors() -> list[Vector]:
    out: list[Vector] = []
    for e in F64_VECTORS["gaussian_draws"]:

        def draws(c, e=e):
            values, used = ref.gaussian_row(e["seed"], e["stream"], 0, e["d_in"], c)
            bits = ref.hex_bits(np.array(values))
            return bits == e["values_f64_bits"] and used == e["draws_used"]

        out.append(Vector(f"gaussian_draws-{_shape(e)}", e["d_in"], draws))
    for e in VECTORS["gaussian"]:
        args = (e["r"], e["d_in"], e["seed"], e["stream"])
        out.append(
            Vector(
                f"gaussian-{_shape(e)}",
                e["r"] * e["d_in"],
                lambda c, e=e, a=args: ref.hex_bits(_g(*a, c)) == e["values_f64_bits"],
            )
        )
    for e in F64_VECTORS["a_f64"]:
        args = (e["r"], e["d_in"], e["seed"], e["stream"], e["gain"])
        out.append(
            Vector(
                f"a_f64-{_shape(e)}-gain{e['gain']}",
                e["r"] * e["d_in"],
                lambda c, e=e, a=args: ref.hex_bits(_a_f64(*a, c)) == e["values_f64_bits"],
            )
        )
    for group in ("small", "rounded"):
        source = VECTORS if group == "small" else F64_VECTORS
        for e in source[group]:
            out.append(
                Vector(
                    f"{group}-{_shape(e)}-{e['dtype']}-gain{e['gain']}",
                    e["r"] * e["d_in"],
                    lambda c, e=e: ref.hex_bits(_rounded(e, c)) == e["bits"],
                )
            )
    for e in F64_VECTORS["gaussian_sha256"]:
        args = (e["r"], e["d_in"], e["seed"], e["stream"])
        out.append(
            Vector(
                f"gaussian_sha256-{_shape(e)}",
                e["r"] * e["d_in"],
                lambda c, e=e, a=args: ref.sha256_le(_g(*a, c)) == e["sha256"],
            )
        )
    for e in F64_VECTORS["a_f64_sha256"]:
        args = (e["r"], e["d_in"], e["seed"], e["stream"], e["gain"])
        out.append(
            Vector(
                f"a_f64_sha256-{_shape(e)}",
                e["r"] * e["d_in"],
                lambda c, e=e, a=args: ref.sha256_le(_a_f64(*a, c)) == e["sha256"],
            )
        )
    for e in VECTORS["sha256"]:
        out.append(
            Vector(
                f"sha256-{_shape(e)}-{e['dtype']}",
                e["r"] * e["d_in"],
                lambda c, e=e: ref.sha256_le(_rounded(e, c)) == e["sha256"],
            )
        )
    return sorted(out, key=lambda v: v.entries)


ALL_VECTORS = _vectors()

#: one changed choice each; every one must be caught by some vector
MUTATIONS = {
    "tables recomputed with glibc exp/log": {"tables": "glibc"},
    "128-layer ziggurat (rand_distr's other tables)": {"tables": "layers128"},
    "layer from the top 8 bits": {"layer_from_low_bits": False},
    "no tail sampler (layer 0 as a wedge)": {"tail": "none"},
    "tail by z = sqrt(R^2 - 2 log u)": {"tail": "sqrt"},
    "tail with the opposite sign": {"tail_sign_flip": True},
    "wedge always accepts": {"wedge_always_accepts": True},
    "ChaCha20 instead of ChaCha12": {"rounds": 20},
    "ChaCha8 instead of ChaCha12": {"rounds": 8},
    "seed big-endian in the key": {"seed_byteorder": "big"},
    "no domain tag in the key": {"key_domain": bytes(16)},
    "seed and stream swapped": {"swap_seed_stream": True},
    "rows 2^32 words apart instead of blocks": {"row_stride_blocks": 2**28},
    "plain sequential dot product": {"dot_lanes": 1},
    "4-lane dot product": {"dot_lanes": 4},
    "lanes combined sequentially": {"lanes_combine": "sequential"},
    "Householder alpha = +sign(x0) * norm": {"householder_alpha": "plus_sign"},
    "no Haar sign fix": {"sign_fix": "none"},
    "fused multiply-add": {"fma": True},
    "gain applied after rounding": {"gain_before_rounding": False},
    "half types by plain RNE through float32": {"half_via_round_to_odd": False},
}


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=lambda v: v.name)
def test_reference_reproduces_the_vector(vector):
    assert vector.holds(ref.SPEC)


def test_every_vector_file_entry_is_checked():
    published = sum(len(VECTORS[k]) for k in ("gaussian", "small", "sha256"))
    published += sum(
        len(F64_VECTORS[k])
        for k in ("gaussian_draws", "gaussian_sha256", "a_f64", "a_f64_sha256", "rounded")
    )
    assert len(ALL_VECTORS) == published


@pytest.mark.parametrize("change", MUTATIONS.values(), ids=list(MUTATIONS))
def test_each_changed_choice_is_caught(change):
    mutant = replace(ref.SPEC, **change)
    limit = FMA_MAX_ENTRIES if mutant.fma else None
    candidates = [v for v in ALL_VECTORS if limit is None or v.entries <= limit]
    caught = next((v.name for v in candidates if not v.holds(mutant)), None)
    assert caught is not None, f"no vector catches {change}"


def test_draw_vectors_take_every_rare_path():
    """Together the ``gaussian_draws`` rows take each rare step of the ziggurat."""
    paths: set[str] = set()
    for e in F64_VECTORS["gaussian_draws"]:
        ref.gaussian_row(e["seed"], e["stream"], 0, e["d_in"], paths=paths)
    assert paths == {
        "tail",
        "tail rejected",
        "wedge accepted",
        "wedge rejected",
        "last layer",
    }


def test_published_tables_close_the_recursion():
    """The published bits are a 256-layer ziggurat: X[1] = R, X[256] = 0, F[256] = 1, and
    layer 255 reaches the peak (V / X[255] + F[255] = 1). Their SHA-256 is checked on load."""
    x, f = ref.published_tables()
    assert len(x) == len(f) == 257
    assert x[1] == ref.ZIG_R and x[256] == 0.0 and f[256] == 1.0
    assert abs(ref.ZIG_V / x[255] + f[255] - 1.0) < 1e-9
    assert all(a > b for a, b in zip(x[1:], x[2:]))
