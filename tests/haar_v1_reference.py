"""An independent implementation of generator haar-v1, written from docs/generator-haar-v1.md.

Plain Python and numpy, no asymlora extension: it regenerates the published vectors, so
the spec text, the Rust code and the vectors check each other. Every choice the spec
makes is a field of :class:`Choices`; ``tests/test_spec_reference.py`` flips them one
at a time and checks that some vector catches each flip.

numpy is used only for exact IEEE-754 element-wise operations (each ``+``, ``-``, ``*``
on float64 arrays is one correctly rounded operation; no ufunc here fuses them) and for
``np.add.accumulate``, which adds strictly in order. ``exp``/``log`` are Python's
``math`` (the platform libm, glibc here), which the spec allows with the caveat it states;
the "glibc" tables mutation relies on that libm differing from musl's, as glibc's does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parents[1] / "docs"
TABLES_PATH = DOCS / "haar-v1-ziggurat-tables.json"

ZIG_R = 3.6541528853610088
ZIG_V = 0.00492867323399
#: rand_distr's 128-layer constants (Marsaglia & Tsang's other published ziggurat)
ZIG128_R = 3.442619855899
ZIG128_V = 9.91256303526217e-3
KEY_DOMAIN = b"asymlora/haar-v1"
SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
TWO_POW_M52 = 2.0**-52
TWO_POW_M53 = 2.0**-53


@dataclass(frozen=True)
class Choices:
    """One field per choice of the spec; the defaults are haar-v1."""

    tables: str = "published"  # or "glibc" (recursion with math.exp/log), "layers128"
    rounds: int = 12  # ChaCha double-round count is rounds // 2
    seed_byteorder: str = "little"
    key_domain: bytes = KEY_DOMAIN
    swap_seed_stream: bool = False
    row_stride_blocks: int = 2**32
    layer_from_low_bits: bool = True  # else the top 8 bits pick the layer
    tail: str = "marsaglia1964"  # or "none" (layer 0 as a wedge), "sqrt" (x = sqrt(R^2 - 2 log u))
    tail_sign_flip: bool = False
    wedge_always_accepts: bool = False
    dot_lanes: int = 8  # 1 is a plain sequential dot product
    lanes_combine: str = "tree"  # or "sequential": l0 + l1 + ... + l7
    householder_alpha: str = "minus_sign"  # or "plus_sign": alpha = sign(x0) * norm
    sign_fix: str = "negative_rkk"  # or "none"
    fma: bool = False  # fused multiply-add in dot and in the reflector update
    gain_before_rounding: bool = True
    half_via_round_to_odd: bool = True  # else plain RNE to float32, then to the half type


SPEC = Choices()


# --- tables -------------------------------------------------------------------------


def tables_bytes(x: list[float], f: list[float]) -> bytes:
    """The bytes the table SHA-256 is over: X[0..=256] then F[0..=256], binary64 LE."""
    return np.array([*x, *f], dtype="<f8").tobytes()


def published_tables() -> tuple[list[float], list[float]]:
    doc = json.loads(TABLES_PATH.read_text())
    x = [_f64(h) for h in doc["X_f64_bits"]]
    f = [_f64(h) for h in doc["F_f64_bits"]]
    if hashlib.sha256(tables_bytes(x, f)).hexdigest() != doc["sha256"]:
        raise ValueError(f"{TABLES_PATH}: sha256 does not match the entries")
    return x, f


def recursion_tables(r: float, v: float, layers: int) -> tuple[list[float], list[float]]:
    """The Marsaglia-Tsang recursion of section 3, with the platform libm."""

    def density(x: float) -> float:
        return math.exp((-0.5 * x) * x)

    x = [0.0] * (layers + 1)
    x[0] = v / density(r)
    x[1] = r
    for i in range(1, layers - 1):
        x[i + 1] = math.sqrt(-2.0 * math.log(v / x[i] + density(x[i])))
    return x, [density(xi) for xi in x]


def _f64(hex_bits: str) -> float:
    return float(np.array([int(hex_bits, 16)], dtype=np.uint64).view(np.float64)[0])


_TABLE_CACHE: dict[str, tuple[list[float], list[float], float, int]] = {}


def tables(choices: Choices) -> tuple[list[float], list[float], float, int]:
    """(X, F, R, layer count) for ``choices.tables``."""
    if choices.tables not in _TABLE_CACHE:
        if choices.tables == "published":
            t = (*published_tables(), ZIG_R, 256)
        elif choices.tables == "glibc":
            t = (*recursion_tables(ZIG_R, ZIG_V, 256), ZIG_R, 256)
        else:
            t = (*recursion_tables(ZIG128_R, ZIG128_V, 128), ZIG128_R, 128)
        _TABLE_CACHE[choices.tables] = t
    return _TABLE_CACHE[choices.tables]


# --- section 1: ChaCha12 keystream --------------------------------------------------


def chacha_blocks(key: bytes, nonce: int, first: int, count: int, rounds: int) -> np.ndarray:
    """Blocks ``first..first+count`` as a (count, 16) uint32 array (vectorised over blocks)."""
    counters = np.arange(first, first + count, dtype=np.uint64)
    s = np.empty((16, count), dtype=np.uint32)
    s[0:4] = np.array(SIGMA, dtype=np.uint32)[:, None]
    s[4:12] = np.frombuffer(key, dtype="<u4")[:, None]
    s[12] = (counters & 0xFFFFFFFF).astype(np.uint32)
    s[13] = (counters >> np.uint64(32)).astype(np.uint32)
    s[14] = nonce & 0xFFFFFFFF
    s[15] = nonce >> 32
    x = s.copy()

    def rotl(v: np.ndarray, n: int) -> np.ndarray:
        return (v << np.uint32(n)) | (v >> np.uint32(32 - n))

    def qr(a: int, b: int, c: int, d: int) -> None:
        x[a] += x[b]
        x[d] = rotl(x[d] ^ x[a], 16)
        x[c] += x[d]
        x[b] = rotl(x[b] ^ x[c], 12)
        x[a] += x[b]
        x[d] = rotl(x[d] ^ x[a], 8)
        x[c] += x[d]
        x[b] = rotl(x[b] ^ x[c], 7)

    for _ in range(rounds // 2):
        qr(0, 4, 8, 12), qr(1, 5, 9, 13), qr(2, 6, 10, 14), qr(3, 7, 11, 15)
        qr(0, 5, 10, 15), qr(1, 6, 11, 12), qr(2, 7, 8, 13), qr(3, 4, 9, 14)
    x += s
    return x.T.copy()


def chacha_key(seed: int, choices: Choices = SPEC) -> bytes:
    return choices.key_domain + seed.to_bytes(8, choices.seed_byteorder) + bytes(8)


class Draws:
    """The 64-bit draws of one row: word pairs of consecutive blocks, low word first."""

    BATCH = 64  # blocks generated at a time

    def __init__(self, seed: int, stream: int, row: int, choices: Choices = SPEC):
        if choices.swap_seed_stream:
            seed, stream = stream, seed
        self.key = chacha_key(seed, choices)
        self.stream = stream
        self.rounds = choices.rounds
        self.block = row * choices.row_stride_blocks
        self.buffer: list[int] = []
        self.pos = 0
        self.used = 0

    def next(self) -> int:
        if self.pos == len(self.buffer):
            words = chacha_blocks(self.key, self.stream, self.block, self.BATCH, self.rounds)
            self.block += self.BATCH
            draws = words[:, 0::2].astype(np.uint64) | (words[:, 1::2].astype(np.uint64) << 32)
            self.buffer = [int(b) for b in draws.ravel()]
            self.pos = 0
        self.pos += 1
        self.used += 1
        return self.buffer[self.pos - 1]


# --- sections 2 and 3: uniforms and the ziggurat ------------------------------------


def signed_unit(b: int) -> float:
    return float(b >> 11) * TWO_POW_M52 - 1.0


def unit(b: int) -> float:
    return float(b >> 11) * TWO_POW_M53


def open_unit(b: int) -> float:
    return (float(b >> 12) + 0.5) * TWO_POW_M52


def normal(draws: Draws, choices: Choices = SPEC, paths: set[str] | None = None) -> float:
    """One standard normal; the rare paths it takes are added to ``paths``."""
    paths = set() if paths is None else paths
    x_tab, f_tab, r, layers = tables(choices)
    mask = layers - 1
    while True:
        b = draws.next()
        i = b & mask if choices.layer_from_low_bits else b >> (64 - layers.bit_length() + 1)
        x = signed_unit(b) * x_tab[i]
        if abs(x) < x_tab[i + 1]:
            return x
        if i == 0 and choices.tail != "none":
            paths.add("tail")
            return tail(draws, x < 0.0, r, choices, paths)
        if i == layers - 1:
            paths.add("last layer")
        y = f_tab[i + 1] + unit(draws.next()) * (f_tab[i] - f_tab[i + 1])
        if choices.wedge_always_accepts or y < math.exp((-0.5 * x) * x):
            paths.add("wedge accepted")
            return x
        paths.add("wedge rejected")


def tail(draws: Draws, negative: bool, r: float, choices: Choices, paths: set[str]) -> float:
    negative ^= choices.tail_sign_flip
    if choices.tail == "sqrt":  # Marsaglia's other tail method: z = sqrt(R^2 - 2 log u)
        while True:
            z = math.sqrt(r * r - 2.0 * math.log(open_unit(draws.next())))
            if unit(draws.next()) * z < r:
                return -z if negative else z
    while True:
        x = math.log(open_unit(draws.next())) / r
        y = math.log(open_unit(draws.next()))
        if -2.0 * y >= x * x:
            return (x - r) if negative else (r - x)
        paths.add("tail rejected")


def gaussian_row(seed: int, stream: int, row: int, d_in: int, choices: Choices = SPEC, paths=None):
    """Row ``row`` of G and the number of draws each entry used (rare paths to ``paths``)."""
    draws = Draws(seed, stream, row, choices)
    values, counts = [], []
    for _ in range(d_in):
        before = draws.used
        values.append(normal(draws, choices, paths))
        counts.append(draws.used - before)
    return values, counts


def gaussian_matrix(r: int, d_in: int, seed: int, stream: int, choices: Choices = SPEC):
    rows = [gaussian_row(seed, stream, i, d_in, choices)[0] for i in range(r)]
    return np.array(rows, dtype=np.float64).reshape(r, d_in)


# --- section 4: Householder QR -------------------------------------------------------


def _fma(a: float, b: float, c: float) -> float:
    """a * b + c rounded once (exact rationals; Python's int division rounds correctly)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def dots(v: np.ndarray, ys: np.ndarray, choices: Choices = SPEC) -> np.ndarray:
    """``dot(v, y)`` for each row ``y`` of ``ys``, in the 8-lane order of section 4."""
    n, lanes = v.shape[0], choices.dot_lanes
    if choices.fma:
        return np.array([_fma_dot(v, y, lanes, choices) for y in ys])
    products = ys * v  # each product rounded
    padded = -(-n // lanes) * lanes  # zero products added to +0.0 lanes change nothing
    p = np.zeros((ys.shape[0], 1 + padded // lanes, lanes))
    p[:, 1:, :].reshape(ys.shape[0], padded)[:, :n] = products
    sums = np.add.accumulate(p, axis=1)[:, -1, :]  # lanes start at +0.0, add in order
    return _combine(sums, choices)


def _fma_dot(v: np.ndarray, y: np.ndarray, lanes: int, choices: Choices) -> float:
    acc = [0.0] * lanes
    for t in range(v.shape[0]):
        acc[t % lanes] = _fma(float(v[t]), float(y[t]), acc[t % lanes])
    return float(_combine(np.array([acc]), choices)[0])


def _combine(lanes: np.ndarray, choices: Choices) -> np.ndarray:
    if lanes.shape[1] == 1:
        return lanes[:, 0]
    if choices.lanes_combine == "sequential":
        total = lanes[:, 0]
        for j in range(1, lanes.shape[1]):
            total = total + lanes[:, j]
        return total
    # pairwise: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) for 8 lanes
    level = [lanes[:, j] for j in range(lanes.shape[1])]
    while len(level) > 1:
        level = [level[j] + level[j + 1] for j in range(0, len(level), 2)]
    return level[0]


def apply(v: np.ndarray, tau: float, ys: np.ndarray, choices: Choices = SPEC) -> None:
    """``y <- y - (tau * dot(v, y)) * v`` for each row of ``ys``, in place."""
    if ys.shape[0] == 0:
        return
    w = tau * dots(v, ys, choices)
    if choices.fma:
        for j in range(ys.shape[0]):
            for t in range(v.shape[0]):
                ys[j, t] = _fma(-float(w[j]), float(v[t]), float(ys[j, t]))
    else:
        ys -= w[:, None] * v[None, :]


def haar_a_f64(g: np.ndarray, choices: Choices = SPEC) -> np.ndarray:
    """The sign-fixed ``Q^T`` of section 4 (gain 1), r x d_in, from G (r x d_in)."""
    # plain IEEE semantics (2/0 = inf, inf*0 = nan), as in Rust: only a mutant gets there
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _haar_a_f64(g, choices)


def _haar_a_f64(g: np.ndarray, choices: Choices) -> np.ndarray:
    r, d = g.shape
    m = g.copy()  # row k of m is column k of M = G^T
    taus, r_diag = [], []
    for k in range(r):
        x = m[k, k:]
        norm = math.sqrt(float(dots(x, x[None, :], choices)[0]))
        if choices.householder_alpha == "minus_sign":
            alpha = -norm if x[0] >= 0.0 else norm
        else:
            alpha = norm if x[0] >= 0.0 else -norm
        if norm == 0.0:
            taus.append(0.0), r_diag.append(0.0)
        else:
            x[0] = x[0] - alpha
            taus.append(float(np.float64(2.0) / dots(x, x[None, :], choices)[0]))
            r_diag.append(alpha)
        apply(x, taus[k], m[k + 1 :, k:], choices)
    q = np.zeros((r, d))
    q[np.arange(r), np.arange(r)] = 1.0
    for k in range(r - 1, -1, -1):
        apply(m[k, k:], taus[k], q[k:, k:], choices)
    if choices.sign_fix == "negative_rkk":
        q[np.array(r_diag) < 0.0] *= -1.0
    return q


def random_orthogonal_f64(r, d_in, seed, stream, gain=1.0, choices: Choices = SPEC):
    a = haar_a_f64(gaussian_matrix(r, d_in, seed, stream, choices), choices)
    return a * gain if gain != 1.0 and choices.gain_before_rounding else a


# --- section 5: rounding --------------------------------------------------------------


def round_to_dtype(a: np.ndarray, dtype: str, gain: float = 1.0, choices: Choices = SPEC):
    """Section 5; returns float32 values or, for the half types, uint16 bit patterns."""
    if dtype == "float32":
        out = a.astype(np.float32)
    else:
        out = _f32_round_to_odd(a) if choices.half_via_round_to_odd else a.astype(np.float32)
        if dtype == "float16":
            out = out.astype(np.float16)
        else:
            b = out.view(np.uint32).astype(np.uint64)
            out = ((b + 0x7FFF + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(
                np.uint16
            )
    if gain != 1.0 and not choices.gain_before_rounding:  # the mutation: scale after rounding
        widened = _widen(out, dtype) * gain
        return round_to_dtype(widened, dtype, 1.0, SPEC)
    return out


def _f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    n = x.astype(np.float32)
    inexact = np.isfinite(x) & (n.astype(np.float64) != x)
    bits = n.view(np.uint32).copy()
    toward_zero = inexact & (np.abs(n.astype(np.float64)) > np.abs(x))
    bits[toward_zero] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def _widen(out: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (out.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return out.astype(np.float64)


def random_orthogonal(r, d_in, seed, stream, dtype, gain=1.0, choices: Choices = SPEC):
    a = random_orthogonal_f64(r, d_in, seed, stream, gain, choices)
    return round_to_dtype(a, dtype, gain, choices)


def hex_bits(a: np.ndarray) -> list[str]:
    a = np.ascontiguousarray(a)
    width = {8: (np.uint64, 16), 4: (np.uint32, 8), 2: (np.uint16, 4)}[a.dtype.itemsize]
    return [f"{int(v):0{width[1]}x}" for v in a.view(width[0]).ravel()]


def sha256_le(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()
