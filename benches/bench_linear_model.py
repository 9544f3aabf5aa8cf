"""The paper's linear model: fit B with A = Q frozen, or A with B frozen; measured vs predicted.

Zhu et al., "Asymmetry in Low-Rank Adapters of Foundation Models" (ICML 2024), Section 4.1,
Lemmas 4.1 and 4.2 and Theorem 4.3, in the setting derived in ``docs/linear-model.md``:
inputs ``x ~ N(0, V V^T)`` (isotropic on a random k-dimensional subspace; k = d_in is
``N(0, I)``), targets ``y = (W0 + Delta) x + eps`` with ``eps ~ N(0, sigma2 I)``, model
``(W0 + B A) x``.

* B-only: ``A = Q`` from ``asymlora.random_orthogonal`` (Haar), B fitted by least squares
  on the projected features ``Q x`` (Lemma 4.1).
* A-only: ``B`` a fixed Gaussian ``d_out x r`` matrix, A fitted by least squares on the
  projected outputs ``(B^T B)^{-1} B^T (y - W0 x)`` (Lemma 4.2). This is the exact minimiser
  of the joint least-squares problem in A (``tests/test_linear_model.py`` checks it).

With n samples the fits use ``np.linalg.lstsq``; with n = infinity (``n=None`` below) the
population optima in closed form. Each fit is scored by its exact population loss above
the noise floor ``d_out * sigma2`` (the excess loss), averaged over seeds (mean +- standard
error), and compared with the prediction from the doc's formulas, computed per seed given
the task (Delta and the input subspace) and averaged the same way.

    .venv/bin/python benches/bench_linear_model.py [--seeds 200] [--out docs]
    bash benches/run.sh linear_model [--seeds 200]

Writes OUT/linear-model.png and OUT/linear-model.json, and replaces the table between the
markers in OUT/linear-model.md when that file exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

# One BLAS thread: the matrices are small, and on a shared 2-core machine OpenBLAS's
# spinning worker threads made some settings 10-50x slower. Must precede numpy's import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from asymlora import random_orthogonal

# Singular values below this fraction of the largest are zero: with rank-k inputs the
# design matrix has d_in - k numerically-zero directions, and keeping them would add
# huge, meaningless coefficients.
RCOND = 1e-10
TABLE_BEGIN = "<!-- table:begin (written by benches/bench_linear_model.py) -->"
TABLE_END = "<!-- table:end -->"


@dataclass(frozen=True)
class Setting:
    """One experimental condition.

    Attributes:
        regime: a short label for tables and plots.
        d_in: input dimension of the adapted layer.
        d_out: output dimension.
        k: rank of the input covariance (inputs isotropic on a k-dimensional subspace).
        r: LoRA rank.
        n: number of training samples, or None for the population optimum (n = infinity).
        sigma2: variance of each output's noise.
    """

    regime: str
    d_in: int
    d_out: int
    k: int
    r: int
    n: int | None
    sigma2: float = 0.5

    def tag(self) -> int:
        """A stable 32-bit id, used as the generator stream and to seed numpy per setting."""
        return zlib.crc32(repr(self).encode())


@dataclass(frozen=True)
class Task:
    """What the seeds share in distribution but not in value: the task to adapt to."""

    w0: np.ndarray  # pretrained weights, d_out x d_in
    delta: np.ndarray  # W_target - W0, d_out x d_in
    basis: np.ndarray  # V, d_in x k, orthonormal columns; Cov[x] = V V^T


class Trial(NamedTuple):
    """Excess population loss of one seed: measured fits and the predictions for them."""

    b_measured: float
    b_predicted: float
    a_measured: float
    a_predicted: float
    signal: float  # ||Delta V||_F^2 = Tr(Delta Sigma Delta^T), the loss with no adapter


# --- the model ------------------------------------------------------------------------


def draw_task(s: Setting, rng: np.random.Generator) -> Task:
    """Pretrained W0, target shift Delta (entries N(0, 1/k): ||Delta V||_F^2 ~ d_out) and V."""
    w0 = rng.standard_normal((s.d_out, s.d_in)) / math.sqrt(s.d_in)
    delta = rng.standard_normal((s.d_out, s.d_in)) / math.sqrt(s.k)
    if s.k == s.d_in:
        basis = np.eye(s.d_in)
    else:
        basis = np.linalg.qr(rng.standard_normal((s.d_in, s.k)))[0]
    return Task(w0, delta, basis)


def draw_samples(
    task: Task, n: int, sigma2: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n rows of x ~ N(0, V V^T) and y = (W0 + Delta) x + eps, eps ~ N(0, sigma2 I)."""
    x = rng.standard_normal((n, task.basis.shape[1])) @ task.basis.T
    noise = math.sqrt(sigma2) * rng.standard_normal((n, task.w0.shape[0]))
    return x, x @ (task.w0 + task.delta).T + noise


def frozen_a(s: Setting, seed: int) -> np.ndarray:
    """Q (r x d_in, orthonormal rows, Haar) from our generator, in float64 for the algebra."""
    q = random_orthogonal(s.r, s.d_in, seed=seed, stream=s.tag(), threads=1)
    return q.astype(np.float64)


def frozen_b(s: Setting, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian d_out x r B: full column rank, its column space uniform (Haar)."""
    return rng.standard_normal((s.d_out, s.r))


def fit_b_only(x: np.ndarray, y: np.ndarray, w0: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Lemma 4.1 on samples: regress the residual y - W0 x on the projected features Q x."""
    return np.linalg.lstsq(x @ q.T, y - x @ w0.T, rcond=RCOND)[0].T


def fit_a_only(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Lemma 4.2 on samples: regress the projected outputs (B^T B)^{-1} B^T (y - W0 x) on x."""
    projected = np.linalg.lstsq(b, (y - x @ w0.T).T, rcond=None)[0].T  # n x r
    return np.linalg.lstsq(x, projected, rcond=RCOND)[0].T


def population_b_star(task: Task, q: np.ndarray) -> np.ndarray:
    """B* = Delta Sigma Q^T (Q Sigma Q^T)^+ = Delta V (Q V)^+ for Sigma = V V^T."""
    return task.delta @ task.basis @ np.linalg.pinv(q @ task.basis, rcond=RCOND)


def population_a_star(task: Task, b: np.ndarray) -> np.ndarray:
    """A* = (B^T B)^{-1} B^T Delta: it does not depend on the inputs at all."""
    return np.linalg.lstsq(b, task.delta, rcond=None)[0]


def excess_loss(task: Task, update: np.ndarray) -> float:
    """Population loss minus the noise floor: ||(Delta - B A) Sigma^{1/2}||_F^2."""
    return float(np.sum(((task.delta - update) @ task.basis) ** 2))


# --- the predictions (docs/linear-model.md, equations (B-n) and (A-n)) -----------------


def predicted_b_only(s: Setting, signal: float) -> float:
    """E[excess] of B-only over Q (Haar), X and eps; signal = ||Delta V||_F^2."""
    p = min(s.r, s.k)  # the features Q x span min(r, k) dimensions
    population = s.d_out * s.sigma2 + (1.0 - p / s.k) * signal
    if s.n is None:
        return population - s.d_out * s.sigma2
    # The unexplained part of Delta x is Gaussian and independent of Q x, so it acts as
    # extra noise: OLS with p Gaussian regressors inflates the whole loss by (n-1)/(n-p-1).
    return population * (s.n - 1) / (s.n - p - 1) - s.d_out * s.sigma2


def predicted_a_only(s: Setting, signal: float) -> float:
    """E[excess] of A-only over B (Gaussian), X and eps; signal = ||Delta V||_F^2."""
    population = (1.0 - s.r / s.d_out) * signal
    if s.n is None:
        return population
    # Well-specified OLS of r projected outputs on k effective regressors: only the noise
    # inside col(B) (r sigma2) is inflated, by k/(n-k-1).
    return population + s.r * s.sigma2 * s.k / (s.n - s.k - 1)


# --- running --------------------------------------------------------------------------


def run_trial(s: Setting, seed: int) -> Trial:
    """Draw a task, fit B-only and A-only on the same data, score both against the formulas."""
    rng = np.random.default_rng([seed, s.tag()])
    task = draw_task(s, rng)
    q, b = frozen_a(s, seed), frozen_b(s, rng)
    if s.n is None:
        b_fit, a_fit = population_b_star(task, q), population_a_star(task, b)
    else:
        x, y = draw_samples(task, s.n, s.sigma2, rng)
        b_fit, a_fit = fit_b_only(x, y, task.w0, q), fit_a_only(x, y, task.w0, b)
    signal = excess_loss(task, np.zeros_like(task.delta))
    return Trial(
        excess_loss(task, b_fit @ q),
        predicted_b_only(s, signal),
        excess_loss(task, b @ a_fit),
        predicted_a_only(s, signal),
        signal,
    )


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(count))."""
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def summarize(s: Setting, seeds: int) -> dict:
    """Run `seeds` trials of a setting; means, standard errors and z-scores.

    The z-scores test each prediction with the per-seed differences measured - predicted,
    so the task-to-task spread of ||Delta V||^2 (shared by both) does not count as error.
    """
    trials = np.array([run_trial(s, seed) for seed in range(seeds)])
    out: dict = {"setting": asdict(s), "seeds": seeds}
    for name, col in (("b_only", 0), ("a_only", 2)):
        measured, predicted = trials[:, col], trials[:, col + 1]
        mean, se = mean_se(measured)
        diff_mean, diff_se = mean_se(measured - predicted)
        out[name] = {
            "measured": mean,
            "se": se,
            "predicted": float(predicted.mean()),
            # Below 1e-9 the two agree to rounding (B-only at n = infinity with rank k <= r).
            "z": diff_mean / diff_se if diff_se > 1e-9 else 0.0,
        }
    gap, gap_se = mean_se(trials[:, 2] - trials[:, 0])
    out["a_minus_b"] = {"mean": gap, "se": gap_se}
    out["signal"] = float(trials[:, 4].mean())
    return out


def table_settings() -> list[Setting]:
    """The table's rows: one per regime, population and finite n."""
    low = Setting("low-rank inputs", 64, 64, 8, 8, None)
    up = Setting("up-proj", 32, 128, 32, 8, None)
    square = Setting("square", 64, 64, 64, 8, None)
    down = Setting("down-proj", 128, 32, 128, 8, None)
    return [
        low,
        replace(low, n=256),
        up,
        replace(up, n=256),
        square,
        replace(square, n=80),
        replace(square, n=1024),
        down,
        replace(down, n=512),
    ]


def sweeps() -> dict[str, tuple[str, list[Setting]]]:
    """The plot's four panels: (swept parameter, settings)."""
    ranks = [1, 2, 4, 8, 16, 32]
    low = Setting("low-rank inputs", 64, 64, 8, 8, 256)
    square = Setting("square", 64, 64, 64, 8, 256)
    return {
        "a": ("r", [replace(low, r=r) for r in ranks]),
        "b": ("k", [Setting("rank sweep", 128, 64, k, 8, None) for k in (4, 8, 16, 32, 64, 128)]),
        "c": ("n", [replace(square, n=n) for n in (72, 80, 96, 128, 192, 256, 512, 1024, 4096)]),
        "d": ("r", [replace(square, r=r) for r in ranks]),
    }


# --- reporting ------------------------------------------------------------------------


def _pm(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {se:.3f}"


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (excess loss = loss - d_out * sigma2)."""
    head = (
        "| regime | d_in | d_out | rank Σ | r | n | B-only measured | B-only predicted | z "
        "| A-only measured | A-only predicted | z | A - B | fits better |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    lines = []
    for row in rows:
        s, b, a, gap = row["setting"], row["b_only"], row["a_only"], row["a_minus_b"]
        n = "∞" if s["n"] is None else str(s["n"])
        winner = (
            "tie" if abs(gap["mean"]) < 3 * gap["se"] else "B-only" if gap["mean"] > 0 else "A-only"
        )
        lines.append(
            f"| {s['regime']} | {s['d_in']} | {s['d_out']} | {s['k']} | {s['r']} | {n} "
            f"| {_pm(b['measured'], b['se'])} | {b['predicted']:.3f} | {b['z']:+.1f} "
            f"| {_pm(a['measured'], a['se'])} | {a['predicted']:.3f} | {a['z']:+.1f} "
            f"| {_pm(gap['mean'], gap['se'])} | {winner} |"
        )
    return head + "\n".join(lines) + "\n"


def _errorbars(ax, xs: list, rows: list[dict], key: str, label: str, color: str, scale=None):
    """Measured mean +- 2 SE as points, prediction as a line."""
    div = [1.0 if scale is None else scale(r) for r in rows]
    measured = [r[key]["measured"] / d for r, d in zip(rows, div)]
    se = [2 * r[key]["se"] / d for r, d in zip(rows, div)]
    predicted = [r[key]["predicted"] / d for r, d in zip(rows, div)]
    ax.plot(xs, predicted, "-", color=color, label=f"{label} predicted")
    ax.errorbar(
        xs, measured, yerr=se, fmt="o", color=color, ms=4, capsize=3, label=f"{label} measured"
    )


def _plot_gap(ax, xs: list, rows: list[dict]) -> None:
    """Panel (c): A-only minus B-only excess vs n, and the predicted crossing."""
    s0 = rows[0]["setting"]
    gap = [r["a_minus_b"]["mean"] for r in rows]
    gap_se = [2 * r["a_minus_b"]["se"] for r in rows]
    pred = [r["a_only"]["predicted"] - r["b_only"]["predicted"] for r in rows]
    ax.plot(xs, pred, "-", color="k", label="predicted")
    ax.errorbar(xs, gap, yerr=gap_se, fmt="o", color="k", ms=4, capsize=3, label="measured")
    ax.axhline(0.0, color="grey", lw=0.8)
    # Equation (square): B-only fits better iff n < 1 + d + d^2 sigma2 / ||Delta||^2.
    d, signal = s0["d_in"], float(np.mean([r["signal"] for r in rows]))
    crossing = 1 + d + d * d * s0["sigma2"] / signal
    ax.axvline(crossing, color="grey", ls=":", label=f"predicted crossing n = {crossing:.0f}")
    ax.set_yscale("symlog", linthresh=2.0)
    # symlog autoscaling clips the largest point; leave it room.
    ax.set_ylim(top=2.0 * max(g + e for g, e in zip(gap, gap_se)))
    ax.set_ylabel("A-only excess - B-only excess\n(> 0: B-only fits better)")
    ax.set_title(f"(c) isotropic square, d={d}, r={s0['r']}: the gap vs n", fontsize=10)


def _plot_losses(ax, key: str, xs: list, rows: list[dict]) -> None:
    """Panels (a), (b), (d): both methods' excess loss, measured and predicted."""
    s0 = rows[0]["setting"]
    scale = (lambda r: r["signal"]) if key == "b" else None
    _errorbars(ax, xs, rows, "b_only", "B-only (A = Q frozen)", "C0", scale)
    _errorbars(ax, xs, rows, "a_only", "A-only (B frozen)", "C3", scale)
    if key == "b":
        ax.axvline(s0["d_out"], color="grey", ls=":", label="rank Σ = d_out")
    ax.set_ylabel("excess loss / ||ΔΣ^½||²" if key == "b" else "excess loss")
    title = {
        "a": f"(a) low-rank inputs: rank Σ={s0['k']}, d_in=d_out={s0['d_in']}, n={s0['n']}",
        "b": f"(b) population (n=∞): d_in={s0['d_in']}, d_out={s0['d_out']}, r={s0['r']}",
        "d": f"(d) isotropic square, d={s0['d_in']}, n={s0['n']}",
    }[key]
    ax.set_title(title, fontsize=10)


def plot(panels: dict[str, tuple[str, list[dict]]], path: Path) -> None:
    """The four panels of docs/linear-model.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"r": "LoRA rank r", "k": "rank of the input covariance Σ", "n": "samples n"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, key in zip(axes.flat, "abcd"):
        param, rows = panels[key]
        xs = [r["setting"][param] for r in rows]
        if key == "c":
            _plot_gap(ax, xs, rows)
        else:
            _plot_losses(ax, key, xs, rows)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(labels[param])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Fitting B with A = Q frozen vs fitting A with B frozen: mean of seeds, ±2 SE", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, table: str, header: str) -> bool:
    """Replace the block between the table markers in doc; False if there is none."""
    if not doc.exists():
        return False
    text = doc.read_text(encoding="utf-8")
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        return False
    block = f"{TABLE_BEGIN}\n\n{header}\n\n{table}\n"
    doc.write_text(text[:start] + block + text[end:], encoding="utf-8")
    return True


def machine() -> str:
    """A one-line description of where this ran."""
    versions = f"Python {platform.python_version()}, numpy {np.__version__}"
    return f"{platform.machine()} {platform.system()}, {_cpu_count()} cores, {versions}"


def _cpu_count() -> int:
    return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> None:
    """Run the table and the sweeps, print the table, write the figure, JSON and doc table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="seeds per setting (200)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="output folder (docs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    rows = [summarize(s, args.seeds) for s in table_settings()]
    panels = {k: (p, [summarize(s, args.seeds) for s in ss]) for k, (p, ss) in sweeps().items()}
    seconds = time.perf_counter() - t0

    table = markdown_table(rows)
    command = "python benches/bench_linear_model.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    header = (
        f"`{command.strip()}`: {args.seeds} seeds per row, {seconds:.0f} s, {date}; "
        f"{machine()}. Excess loss = population loss - d_out·σ² (σ² = 0.5); "
        "z = (measured - predicted) / SE, from per-seed differences."
    )
    print(header + "\n\n" + table)
    plot(panels, args.out / "linear-model.png")
    result = {"command": command, "date": date, "machine": machine(), "seconds": seconds}
    result.update(table=rows, panels={k: {"param": p, "rows": r} for k, (p, r) in panels.items()})
    (args.out / "linear-model.json").write_text(
        json.dumps(result, indent=1) + "\n", encoding="utf-8"
    )
    if update_doc(args.out / "linear-model.md", table, header):
        print(f"updated the table in {args.out / 'linear-model.md'}")
    print(f"wrote {args.out / 'linear-model.png'} and {args.out / 'linear-model.json'}")


if __name__ == "__main__":
    main()
