"""The paper's linear model (docs/linear-model.md): closed forms, predictions, the asymmetry.

The math lives in benches/bench_linear_model.py (imported from its path); these tests run
it at small sizes: the closed-form optima against generic least squares, each measured
mean loss against its predicted expectation, and the sign of the B-only vs A-only gap
where the doc says it holds and where it says it reverses.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SEEDS = 50
# |mean(measured - predicted)| must stay within this many standard errors. With about a
# dozen checks, a correct formula fails one only with probability ~1e-3.
Z_MAX = 4.0


def _load_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benches" / "bench_linear_model.py"
    spec = importlib.util.spec_from_file_location("bench_linear_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


blm = _load_bench()
Setting = blm.Setting

LOW_RANK = Setting("low-rank inputs", 24, 24, 4, 4, 48)  # rank Sigma = r < d_out
SQUARE = Setting("square", 16, 16, 16, 4, 40)  # isotropic, rank Sigma = d_out
DOWN = Setting("down-proj", 32, 8, 32, 2, 64)  # isotropic, rank Sigma > d_out
PREDICTION_CASES = [
    LOW_RANK,
    replace(LOW_RANK, n=None),
    replace(LOW_RANK, r=2),  # r < rank Sigma: Q x misses part of the input subspace
    replace(LOW_RANK, r=8),  # r > rank Sigma: only rank Sigma features are independent
    SQUARE,
    replace(SQUARE, n=None),
    DOWN,
]


@pytest.fixture(scope="module")
def trials() -> dict[Setting, np.ndarray]:
    """SEEDS trials (rows of blm.Trial) per setting, computed once for the module."""
    return {
        s: np.array([blm.run_trial(s, seed) for seed in range(SEEDS)]) for s in PREDICTION_CASES
    }


def _z(values: np.ndarray) -> float:
    """Mean of values in standard errors (0 when they are all zero up to rounding)."""
    se = values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() / se) if se > 1e-9 else 0.0


def _task_and_data(n: int) -> tuple:
    s = Setting("check", 10, 12, 10, 3, n)
    rng = np.random.default_rng(7)
    task = blm.draw_task(s, rng)
    x, y = blm.draw_samples(task, n, s.sigma2, rng)
    return s, task, x, y, blm.frozen_a(s, seed=7), blm.frozen_b(s, rng)


def test_b_only_fit_is_the_least_squares_optimum() -> None:
    """Lemma 4.1 on samples: B = T^T Z (Z^T Z)^{-1}, and the gradient in B vanishes there."""
    _, task, x, y, q, _ = _task_and_data(40)
    t, z = y - x @ task.w0.T, x @ q.T
    b = blm.fit_b_only(x, y, task.w0, q)
    np.testing.assert_allclose(b, t.T @ z @ np.linalg.inv(z.T @ z), rtol=1e-9, atol=1e-12)
    gradient = -2.0 * (t - z @ b.T).T @ z
    assert np.abs(gradient).max() < 1e-9 * np.abs(t).sum()


def test_a_only_fit_is_the_joint_least_squares_optimum() -> None:
    """Lemma 4.2 on samples: projecting the outputs on col(B) and regressing on x gives
    the same A as solving min_A ||T - X A^T B^T|| directly (as one Kronecker system)."""
    s, task, x, y, _, b = _task_and_data(40)
    t = y - x @ task.w0.T
    a = blm.fit_a_only(x, y, task.w0, b)
    # vec(X M B^T) = (B kron X) vec(M) for column-major vec, with M = A^T.
    design = np.kron(b, x)
    vec_m = np.linalg.lstsq(design, t.flatten(order="F"), rcond=None)[0]
    np.testing.assert_allclose(a, vec_m.reshape((s.d_in, s.r), order="F").T, atol=1e-9)
    gradient = -2.0 * b.T @ (t - x @ a.T @ b.T).T @ x
    assert np.abs(gradient).max() < 1e-9 * np.abs(t).sum()


def test_population_optima_have_zero_gradient_and_lemma_losses() -> None:
    """B* = Delta Sigma Q^T (Q Sigma Q^T)^{-1} and A* = (B^T B)^{-1} B^T Delta are stationary
    for the population loss, and their excess losses are the lemmas' closed forms."""
    s, task, _, _, q, b = _task_and_data(40)
    sigma = task.basis @ task.basis.T
    b_star, a_star = blm.population_b_star(task, q), blm.population_a_star(task, b)
    assert np.abs((task.delta - b_star @ q) @ sigma @ q.T).max() < 1e-10
    assert np.abs(b.T @ (task.delta - b @ a_star) @ sigma).max() < 1e-10
    # Lemma 4.1: ||Delta||^2 - ||Delta Q^T||^2 (isotropic: Sigma = I, Q Q^T = I).
    signal = float(np.sum(task.delta**2))
    lemma_b = signal - float(np.sum((task.delta @ q.T) ** 2))
    assert blm.excess_loss(task, b_star @ q) == pytest.approx(lemma_b, rel=1e-7)
    # Lemma 4.2: ||(I - P_B) Delta||^2.
    p_b = b @ np.linalg.solve(b.T @ b, b.T)
    lemma_a = float(np.sum(((np.eye(s.d_out) - p_b) @ task.delta) ** 2))
    assert blm.excess_loss(task, b @ a_star) == pytest.approx(lemma_a, rel=1e-10)


@pytest.mark.parametrize("setting", PREDICTION_CASES, ids=lambda s: f"{s.regime}-r{s.r}-n{s.n}")
def test_measured_loss_matches_prediction(setting, trials) -> None:
    """Each mean excess loss is within Z_MAX standard errors of its predicted expectation."""
    runs = trials[setting]
    z_b = _z(runs[:, 0] - runs[:, 1])
    z_a = _z(runs[:, 2] - runs[:, 3])
    assert abs(z_b) < Z_MAX, f"B-only: measured {runs[:, 0].mean():.4f}, z = {z_b:.1f}"
    assert abs(z_a) < Z_MAX, f"A-only: measured {runs[:, 2].mean():.4f}, z = {z_a:.1f}"


@pytest.mark.parametrize("setting", [LOW_RANK, replace(LOW_RANK, n=None)], ids=["n48", "pop"])
def test_b_only_beats_a_only_when_inputs_are_low_rank(setting, trials) -> None:
    """rank Sigma <= r < d_out: freezing A costs only variance, freezing B costs 1 - r/d_out."""
    runs = trials[setting]
    gap = runs[:, 2] - runs[:, 0]
    assert _z(gap) > Z_MAX
    assert runs[:, 0].mean() < 0.2 * runs[:, 2].mean()


def test_the_asymmetry_reverses_for_isotropic_down_projections(trials) -> None:
    """rank Sigma = d_in > d_out: the doc's caveat, A-only fits better."""
    runs = trials[DOWN]
    assert _z(runs[:, 0] - runs[:, 2]) > Z_MAX
