"""random_orthogonal / random_orthogonal_many / gaussian_matrix: properties, dtypes,
agreement with an independent (numpy) QR, Haar statistics, argument errors, GIL."""

from __future__ import annotations

import threading
import time

import ml_dtypes
import numpy as np
import pytest
from scipy import stats

import asymlora

ORTHONORMALITY_TOL = 2e-6


def orthonormality_error(a: np.ndarray) -> float:
    a64 = np.asarray(a, dtype=np.float64)
    return float(np.abs(a64 @ a64.T - np.eye(a.shape[0])).max())


def numpy_reference(r: int, d_in: int, seed: int, stream: int) -> np.ndarray:
    """A in float64 from numpy's QR of the same Gaussian matrix, with the sign fix."""
    g = asymlora.gaussian_matrix(r, d_in, seed=seed, stream=stream)
    q, rr = np.linalg.qr(g.T)
    signs = np.sign(np.diag(rr))
    signs[signs == 0] = 1.0
    return (q * signs).T


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Correctly rounded (nearest, ties to even) float64 -> bfloat16, normal range.

    ``ml_dtypes`` goes float64 -> float32 -> bfloat16, which rounds twice.
    """
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return np.ldexp(np.rint(mantissa * 2.0**8), exponent - 8).astype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("r", "d_in"),
    [(1, 1), (1, 7), (3, 8), (5, 5), (128, 128), (16, 4096), (64, 4096), (16, 11008)],
)
def test_rows_are_orthonormal_float32(r, d_in):
    a = asymlora.random_orthogonal(r, d_in, seed=123, stream=r * 1000 + d_in)
    assert a.dtype == np.float32
    assert a.shape == (r, d_in)
    assert a.flags.c_contiguous
    assert np.all(np.isfinite(a))
    assert orthonormality_error(a) <= ORTHONORMALITY_TOL


def test_square_is_orthogonal_both_ways():
    a = asymlora.random_orthogonal(32, 32, seed=9, stream=4).astype(np.float64)
    assert np.abs(a.T @ a - np.eye(32)).max() <= ORTHONORMALITY_TOL
    assert abs(abs(np.linalg.det(a)) - 1.0) <= 1e-5


def test_one_by_one_is_plus_or_minus_one():
    values = {float(asymlora.random_orthogonal(1, 1, seed=s)[0, 0]) for s in range(64)}
    assert values == {1.0, -1.0}


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", np.dtype(np.float32)),
        ("float16", np.dtype(np.float16)),
        ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
        (np.float32, np.dtype(np.float32)),
        (np.float16, np.dtype(np.float16)),
        (ml_dtypes.bfloat16, np.dtype(ml_dtypes.bfloat16)),
        (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.bfloat16)),
    ],
)
def test_output_dtype_and_shape(dtype, expected):
    a = asymlora.random_orthogonal(4, 24, seed=1, stream=2, dtype=dtype)
    assert a.dtype == expected
    assert a.shape == (4, 24)
    by_name = asymlora.random_orthogonal(4, 24, seed=1, stream=2, dtype=expected.name)
    assert a.tobytes() == by_name.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_within_half_ulp_of_float32(dtype):
    r, d_in = 16, 4096
    a32 = asymlora.random_orthogonal(r, d_in, seed=5, stream=1).astype(np.float64)
    half = asymlora.random_orthogonal(r, d_in, seed=5, stream=1, dtype=dtype)
    half64 = half.astype(np.float64)
    spacing = np.spacing(np.abs(half)).astype(np.float64)  # ulp of the half type at |A|
    # |half - exact| <= ulp/2 and |f32 - exact| <= f32 ulp/2
    tol = 0.5 * spacing + np.spacing(np.abs(a32.astype(np.float32))).astype(np.float64)
    assert np.all(np.abs(half64 - a32) <= tol)
    assert orthonormality_error(half) <= (2e-2 if dtype == "bfloat16" else 3e-3)


@pytest.mark.parametrize(("r", "d_in"), [(64, 4096), (16, 11008), (128, 128)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_single_rounding_from_float64(r, d_in, dtype):
    """Each element is the float64 A rounded once (nearest-even) to the output dtype.

    The float64 A is numpy's QR of the same Gaussian matrix; it agrees with the
    generator's float64 result to ~1e-16, so a tie that the two round apart is
    all but impossible. Rounding via float32 (double rounding) changes several
    float16 elements of these shapes, which this check catches.
    """
    reference = numpy_reference(r, d_in, seed=0, stream=3)
    a = asymlora.random_orthogonal(r, d_in, seed=0, stream=3, dtype=dtype)
    if dtype == "bfloat16":
        expected = round_to_bfloat16(reference)
    else:
        expected = reference.astype(a.dtype)  # numpy's casts from float64 round once
    assert expected.dtype == a.dtype
    uint = np.uint32 if a.dtype.itemsize == 4 else np.uint16
    mismatches = int(np.count_nonzero(a.view(uint) != expected.view(uint)))
    assert mismatches <= 1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gain_power_of_two_is_exact(dtype):
    base = asymlora.random_orthogonal(8, 40, seed=3, stream=3, dtype=dtype)
    doubled = asymlora.random_orthogonal(8, 40, seed=3, stream=3, dtype=dtype, gain=2.0)
    negated = asymlora.random_orthogonal(8, 40, seed=3, stream=3, dtype=dtype, gain=-1.0)
    np.testing.assert_array_equal(doubled.astype(np.float64), 2.0 * base.astype(np.float64))
    np.testing.assert_array_equal(negated.astype(np.float64), -base.astype(np.float64))


def test_gain_scales_before_rounding():
    """gain=1/3 is applied in float64, then rounded once: close to A/3, not A32/3 exactly."""
    base = numpy_reference(8, 40, seed=3, stream=3)
    scaled = asymlora.random_orthogonal(8, 40, seed=3, stream=3, gain=1.0 / 3.0)
    np.testing.assert_allclose(scaled, base / 3.0, rtol=1e-6, atol=1e-9)


def test_zero_gain_is_an_error():
    with pytest.raises(ValueError) as excinfo:
        asymlora.random_orthogonal(2, 4, seed=0, gain=0.0)
    assert_names(excinfo, "gain")


# 1 x 1 with (seed 5, stream 5) is exactly -1.0 (pinned), so A = -gain rounded once:
# a probe of the final rounding step on chosen binary64 values.
MINUS_ONE = {"r": 1, "d_in": 1, "seed": 5, "stream": 5}


def rounded_by_generator(values: np.ndarray, dtype: str) -> np.ndarray:
    out = [
        asymlora.random_orthogonal(**MINUS_ONE, dtype=dtype, gain=-float(v))[0, 0] for v in values
    ]
    return np.array(out, dtype=out[0].dtype)


def test_minus_one_probe():
    a = asymlora.random_orthogonal(**MINUS_ONE)
    assert a.tolist() == [[-1.0]]


@pytest.mark.parametrize(
    ("value", "dtype", "expected_bits"),
    [
        (1 + 2**-11 + 2**-40, "float16", 0x3C01),  # double rounding via f32 would give 1.0
        (1 + 2**-11, "float16", 0x3C00),  # tie -> even
        (1 + 3 * 2**-11, "float16", 0x3C02),  # tie -> even (up)
        (-(1 + 2**-11 + 2**-40), "float16", 0xBC01),
        (2**-25, "float16", 0x0000),  # tie at half the smallest subnormal -> 0
        (2**-25 + 2**-60, "float16", 0x0001),
        (65504.0, "float16", 0x7BFF),
        (65520.0, "float16", 0x7C00),  # tie above max -> inf
        (1 + 2**-8 + 2**-30, "bfloat16", 0x3F81),  # ml_dtypes' f64->bf16 gives 1.0 here
        (1 + 2**-8, "bfloat16", 0x3F80),
        (1 + 3 * 2**-8, "bfloat16", 0x3F82),
        (1 + 2**-24 + 2**-40, "float32", 0x3F800001),
        (1 + 2**-24, "float32", 0x3F800000),
    ],
)
def test_single_rounding_of_chosen_values(value, dtype, expected_bits):
    a = rounded_by_generator(np.array([value]), dtype)
    uint = np.uint32 if dtype == "float32" else np.uint16
    assert int(a.view(uint)[0]) == expected_bits


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_single_rounding_of_random_values(dtype):
    rng = np.random.default_rng(17)
    mantissas = rng.uniform(1.0, 2.0, 400)
    exponents = rng.integers(-20 if dtype == "float16" else -100, 10, 400)
    values = np.ldexp(mantissas, exponents) * rng.choice([-1.0, 1.0], 400)
    # one binary64 ulp above a half-way point of the target, where rounding through
    # float32 with round-to-nearest would land on the tie and round to even instead
    bits = 11 if dtype == "float16" else 8
    halves = 1.0 + (2 * rng.integers(0, 2 ** (bits - 2), 100) + 1) * 2.0**-bits
    values = np.concatenate([values, np.nextafter(halves, 2.0)])
    got = rounded_by_generator(values, dtype)
    expected = values.astype(np.float16) if dtype == "float16" else round_to_bfloat16(values)
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


# --------------------------------------------------------------------------- numpy agreement


@pytest.mark.parametrize(
    ("r", "d_in", "seed", "stream"),
    [(1, 10, 0, 0), (3, 8, 42, 7), (16, 300, 1, 2), (50, 50, 2**64 - 1, 2**63), (32, 2048, 7, 9)],
)
def test_agrees_with_numpy_qr(r, d_in, seed, stream):
    reference = numpy_reference(r, d_in, seed, stream)
    a = asymlora.random_orthogonal(r, d_in, seed=seed, stream=stream)
    assert np.allclose(a.astype(np.float64), reference, rtol=0, atol=1e-6)


def test_gaussian_matrix_rows_are_prefix_stable():
    small = asymlora.gaussian_matrix(2, 50, seed=1, stream=1)
    large = asymlora.gaussian_matrix(5, 50, seed=1, stream=1)
    np.testing.assert_array_equal(small, large[:2])


def test_gaussian_matrix_looks_standard_normal():
    g = asymlora.gaussian_matrix(64, 1000, seed=11, stream=0).ravel()
    assert abs(g.mean()) < 5 / np.sqrt(g.size)
    assert abs(g.std() - 1.0) < 0.01
    assert stats.kstest(g, "norm").pvalue > 1e-3


def test_gaussian_rows_do_not_depend_on_d_in():
    """A shorter row is a prefix of a longer one (generator spec, 'Consequences')."""
    short = asymlora.gaussian_matrix(3, 5, seed=4, stream=4)
    long = asymlora.gaussian_matrix(3, 300, seed=4, stream=4)
    np.testing.assert_array_equal(short, long[:, :5])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raising_rank_keeps_the_first_rows(dtype):
    """The first r rows of A(r', d_in) equal A(r, d_in), bit for bit."""
    a5 = asymlora.random_orthogonal(5, 50, seed=1, stream=1, dtype=dtype)
    for r in (1, 2, 4):
        a = asymlora.random_orthogonal(r, 50, seed=1, stream=1, dtype=dtype)
        assert a.tobytes() == a5[:r].tobytes()


def test_changing_d_in_changes_all_of_a():
    a = asymlora.random_orthogonal(4, 64, seed=1, stream=1)
    b = asymlora.random_orthogonal(4, 65, seed=1, stream=1)[:, :64]
    assert np.count_nonzero(a == b) <= 2


def test_documented_numpy_recipe():
    """The snippet in docs/generator-haar-v1.md, 'Reproducing A with numpy'."""
    r, d_in, seed, stream = 4, 64, 0, 3
    g = asymlora.gaussian_matrix(r, d_in, seed=seed, stream=stream)
    q, rr = np.linalg.qr(g.T)
    q = q * np.sign(np.diag(rr))
    a_ref = q.T
    a = asymlora.random_orthogonal(r, d_in, seed=seed, stream=stream, dtype="float32")
    assert np.allclose(a, a_ref, atol=1e-6)
    assert np.allclose(a @ a.T, np.eye(r), atol=1e-6)
    assert np.abs(a - a_ref).max() < 1e-7


# --------------------------------------------------------------------------- Haar statistics

N_DRAWS = 2000


@pytest.fixture(scope="module")
def draws_2x5() -> np.ndarray:
    """N_DRAWS matrices (2 x 5), one per seed, stream 0."""
    return np.stack(
        [asymlora.random_orthogonal(2, 5, seed=s, threads=1) for s in range(N_DRAWS)]
    ).astype(np.float64)


@pytest.fixture(scope="module")
def draws_3x8_streams() -> np.ndarray:
    """N_DRAWS matrices (3 x 8) from one seed, streams 0..N_DRAWS-1, in one batch."""
    many = asymlora.random_orthogonal_many([(3, 8)] * N_DRAWS, seed=77, streams=range(N_DRAWS))
    return np.stack(many).astype(np.float64)


@pytest.mark.parametrize("which", ["seeds", "streams"])
def test_mean_square_entry_is_one_over_d_in(which, draws_2x5, draws_3x8_streams):
    draws = draws_2x5 if which == "seeds" else draws_3x8_streams
    d = draws.shape[2]
    sq = draws**2
    # A_ij^2 ~ Beta(1/2, (d-1)/2): mean 1/d, variance 2(d-1)/(d^2 (d+2))
    se = np.sqrt(2 * (d - 1) / (d**2 * (d + 2)) / draws.shape[0])
    assert np.all(np.abs(sq.mean(axis=0) - 1.0 / d) <= 5 * se)


@pytest.mark.parametrize("which", ["seeds", "streams"])
def test_signs_are_symmetric(which, draws_2x5, draws_3x8_streams):
    draws = draws_2x5 if which == "seeds" else draws_3x8_streams
    n = draws.shape[0]
    for i, j in [(0, 0), (1, 0), (0, 3), (1, 4)]:
        positive = int(np.count_nonzero(draws[:, i, j] > 0))
        assert stats.binomtest(positive, n, 0.5).pvalue > 1e-4, (i, j, positive)


@pytest.mark.parametrize(("i", "j"), [(0, 0), (1, 3)])
def test_entry_distribution_matches_scipy_ortho_group(draws_2x5, i, j):
    haar = stats.ortho_group.rvs(dim=5, size=N_DRAWS, random_state=12345)
    ours = draws_2x5[:, i, j]
    assert stats.ks_2samp(ours, haar[:, i, j]).pvalue > 1e-3


@pytest.mark.parametrize(("i", "j"), [(0, 0), (1, 2), (1, 4)])
def test_squared_entry_is_beta(draws_2x5, i, j):
    d = draws_2x5.shape[2]
    sq = draws_2x5[:, i, j] ** 2
    assert stats.kstest(sq, stats.beta(0.5, (d - 1) / 2).cdf).pvalue > 1e-3


def test_squared_entry_is_beta_for_stream_batch(draws_3x8_streams):
    d = draws_3x8_streams.shape[2]
    sq = draws_3x8_streams[:, 2, 5] ** 2
    assert stats.kstest(sq, stats.beta(0.5, (d - 1) / 2).cdf).pvalue > 1e-3


def test_rows_within_draws_are_uncorrelated_across_draws(draws_3x8_streams):
    # E[A_0j A_1j] = 0 for Haar rows
    products = (draws_3x8_streams[:, 0, :] * draws_3x8_streams[:, 1, :]).mean(axis=0)
    assert np.all(np.abs(products) < 5 * np.sqrt(1 / (8 * 10) / N_DRAWS))


@pytest.mark.parametrize(
    ("a_key", "b_key"),
    [
        ((0, 0), (0, 1)),
        ((0, 0), (1, 0)),
        ((0, 0), (2**32, 0)),
        ((0, 0), (0, 2**32)),
        ((0, 0), (2**63, 0)),
        ((0, 0), (0, 2**63)),
        ((1, 2), (2, 1)),
        ((2**64 - 1, 0), (0, 2**64 - 1)),
    ],
    ids=lambda key: f"seed{key[0]}-stream{key[1]}",
)
def test_distinct_seeds_and_streams_are_independent(a_key, b_key):
    d_in = 4096
    a = asymlora.random_orthogonal(4, d_in, seed=a_key[0], stream=a_key[1]).astype(np.float64)
    b = asymlora.random_orthogonal(4, d_in, seed=b_key[0], stream=b_key[1]).astype(np.float64)
    assert not np.array_equal(a, b)
    # inner products of independent unit vectors in R^d have sd 1/sqrt(d)
    assert np.abs(a @ b.T).max() < 6 / np.sqrt(d_in)
    g_a = asymlora.gaussian_matrix(2, 64, seed=a_key[0], stream=a_key[1])
    g_b = asymlora.gaussian_matrix(2, 64, seed=b_key[0], stream=b_key[1])
    assert not np.any(g_a == g_b)


def test_rows_of_one_gaussian_matrix_differ():
    g = asymlora.gaussian_matrix(3, 256, seed=0, stream=0)
    assert len({row.tobytes() for row in g}) == 3
    assert np.abs(np.corrcoef(g)[np.triu_indices(3, 1)]).max() < 6 / np.sqrt(256)


def test_same_inputs_same_bits():
    a = asymlora.random_orthogonal(7, 33, seed=8, stream=8, dtype="bfloat16")
    b = asymlora.random_orthogonal(7, 33, seed=8, stream=8, dtype="bfloat16")
    assert a.tobytes() == b.tobytes()


def test_numpy_integer_arguments_are_accepted():
    a = asymlora.random_orthogonal(
        np.int64(3), np.uint32(9), seed=np.uint64(2**64 - 1), stream=np.int8(4)
    )
    b = asymlora.random_orthogonal(3, 9, seed=2**64 - 1, stream=4)
    assert a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------- many


def test_many_empty():
    assert asymlora.random_orthogonal_many([], seed=0, streams=[]) == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_many_equals_singles(dtype):
    shapes = [(1, 1), (4, 4), (2, 100), (8, 64), (16, 33)]
    streams = [5, 2**63, 0, 17, 5000]
    many = asymlora.random_orthogonal_many(
        shapes, seed=99, streams=streams, dtype=dtype, gain=0.75, threads=2
    )
    for a, (r, d_in), stream in zip(many, shapes, streams):
        single = asymlora.random_orthogonal(r, d_in, seed=99, stream=stream, dtype=dtype, gain=0.75)
        assert a.dtype == single.dtype
        assert a.shape == (r, d_in)
        assert a.tobytes() == single.tobytes()


def test_many_accepts_iterables():
    many = asymlora.random_orthogonal_many(iter([(2, 3), [1, 4]]), seed=0, streams=range(2))
    assert [a.shape for a in many] == [(2, 3), (1, 4)]


# --------------------------------------------------------------------------- errors


def assert_names(excinfo: pytest.ExceptionInfo, name: str) -> None:
    message = str(excinfo.value)
    assert message.startswith(f"{name} ") or f"`{name}`" in message, message


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"r": 5, "d_in": 4}, "r"),
        ({"r": 0, "d_in": 4}, "r"),
        ({"r": 1, "d_in": 0}, "r"),
        ({"r": -1, "d_in": 4}, "r"),
        ({"r": 2.0, "d_in": 4}, "r"),
        ({"d_in": -4}, "d_in"),
        ({"d_in": "4"}, "d_in"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": np.int32}, "dtype"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": None}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"stream": -1}, "stream"),
        ({"stream": 2**64}, "stream"),
        ({"stream": False}, "stream"),
        ({"threads": 0}, "threads"),
        ({"threads": -2}, "threads"),
        ({"threads": 1.5}, "threads"),
        ({"gain": float("nan")}, "gain"),
        ({"gain": float("inf")}, "gain"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"r": 2, "d_in": 4, "seed": 0, **kwargs}
    r, d_in = args.pop("r"), args.pop("d_in")
    with pytest.raises(ValueError) as excinfo:
        asymlora.random_orthogonal(r, d_in, **args)
    assert_names(excinfo, name)


def test_seed_is_required():
    with pytest.raises(TypeError):
        asymlora.random_orthogonal(2, 4)  # type: ignore[call-arg]


def test_seed_is_keyword_only():
    with pytest.raises(TypeError):
        asymlora.random_orthogonal(2, 4, 0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shapes", "streams", "name"),
    [
        ([(2, 4), (2, 4)], [0], "streams"),
        ([(2, 4)], [0, 1], "streams"),
        ([], [0], "streams"),
        ([(2, 4), (2, 4)], [0, -1], "streams[1]"),
        ([(2, 4), (5, 4)], [0, 1], "r"),
        ([(2, 4), (0, 4)], [0, 1], "r"),
    ],
)
def test_many_bad_arguments(shapes, streams, name):
    with pytest.raises(ValueError) as excinfo:
        asymlora.random_orthogonal_many(shapes, seed=0, streams=streams)
    assert_names(excinfo, name)


def test_many_bad_shape_tuple_names_index():
    with pytest.raises(ValueError, match=r"shapes\[1\]"):
        asymlora.random_orthogonal_many([(2, 4), (2,)], seed=0, streams=[0, 1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": -1, "streams": [0]}, "seed"),
        ({"seed": 0, "streams": [2**64]}, "streams[0]"),
        ({"seed": 0, "streams": [0], "threads": 0}, "threads"),
        ({"seed": 0, "streams": [0], "dtype": "int4"}, "dtype"),
    ],
)
def test_many_bad_scalar_arguments(kwargs, name):
    with pytest.raises(ValueError) as excinfo:
        asymlora.random_orthogonal_many([(2, 4)], **kwargs)
    assert_names(excinfo, name)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": -1}, "seed"),
        ({"stream": -1}, "stream"),
        ({"r": True}, "r"),
        ({"d_in": 1.0}, "d_in"),
    ],
)
def test_gaussian_matrix_bad_arguments(kwargs, name):
    args = {"r": 2, "d_in": 4, "seed": 0, **kwargs}
    r, d_in = args.pop("r"), args.pop("d_in")
    with pytest.raises(ValueError) as excinfo:
        asymlora.gaussian_matrix(r, d_in, **args)
    assert_names(excinfo, name)


# --------------------------------------------------------------------------- GIL


def _spin_while_alive(thread: threading.Thread) -> tuple[int, float]:
    """Counts main-thread loop iterations until ``thread`` ends; returns (count, seconds)."""
    counter = 0
    t0 = time.perf_counter()
    thread.start()
    while thread.is_alive():
        counter += 1
    return counter, time.perf_counter() - t0


def test_many_releases_the_gil():
    """While a batch runs in a worker thread, the main thread keeps running Python."""
    shapes = [(64, 4096)] * 24
    streams = list(range(len(shapes)))
    result: dict[str, float] = {}

    def work() -> None:
        t0 = time.perf_counter()
        out = asymlora.random_orthogonal_many(shapes, seed=1, streams=streams, threads=1)
        result["seconds"] = time.perf_counter() - t0
        result["count"] = len(out)

    # warm up, then the loop rate while the other thread sleeps (GIL free)
    asymlora.random_orthogonal_many(shapes[:1], seed=1, streams=streams[:1], threads=1)
    idle, idle_seconds = _spin_while_alive(threading.Thread(target=time.sleep, args=(0.15,)))
    rate = idle / idle_seconds

    busy, busy_seconds = _spin_while_alive(threading.Thread(target=work))

    assert result["count"] == len(shapes)
    native_seconds = result["seconds"]
    assert native_seconds > 0.05, "workload too small to measure; enlarge it"
    # With the GIL held, the main thread would run for one switch interval (5 ms)
    # at most during the native call: a few percent of this. Released: most of it.
    expected = rate * min(native_seconds, busy_seconds)
    assert busy >= 0.3 * expected, (busy, expected, native_seconds)
