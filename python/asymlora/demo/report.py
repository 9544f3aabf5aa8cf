"""The demo's table, JSON and plot."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asymlora.demo.train import RunResult

if TYPE_CHECKING:
    from asymlora.demo.multi import MultiResult


@dataclass
class MethodSummary:
    """One method over all its seeds."""

    method: str
    learning_rate: float
    accuracies: list[float]
    trainable_parameters: int
    adapter_bytes: int | None
    median_step_s: float
    peak_memory_mib: float
    memory_kind: str

    @property
    def accuracy(self) -> float:
        """Mean test accuracy over the seeds."""
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float | None:
        """Sample standard deviation over the seeds (None for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else None


def summarise(runs: list[RunResult]) -> list[MethodSummary]:
    """Per method, in the order the methods first appear in ``runs``."""
    names = list(dict.fromkeys(r.method for r in runs))
    summaries = []
    for name in names:
        mine = [r for r in runs if r.method == name]
        summaries.append(
            MethodSummary(
                method=name,
                learning_rate=mine[0].learning_rate,
                accuracies=[r.accuracy for r in mine],
                trainable_parameters=mine[0].trainable_parameters,
                adapter_bytes=mine[0].adapter_bytes,
                median_step_s=statistics.median(r.median_step_s for r in mine),
                peak_memory_mib=max(r.peak_memory_mib for r in mine),
                memory_kind=mine[0].memory_kind,
            )
        )
    return summaries


def table(summaries: list[MethodSummary]) -> str:
    """A fixed-width text table, one row per method."""
    seeds = max(len(s.accuracies) for s in summaries)
    accuracy_title = "test acc" if seeds == 1 else f"test acc ({seeds} seeds)"
    width = max(14, *(len(s.method) for s in summaries))
    head = (
        f"{'method':<{width}} {'lr':>7} {accuracy_title:>19} {'trainable':>10} "
        f"{'adapter bytes':>14} {'step ms':>8} {summaries[0].memory_kind + ' MiB':>17}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        acc = f"{s.accuracy:.4f}" + (f" ± {s.spread:.4f}" if s.spread is not None else "")
        size = f"{s.adapter_bytes:,}" if s.adapter_bytes is not None else "-"
        lines.append(
            f"{s.method:<{width}} {s.learning_rate:>7.0e} {acc:>19} {s.trainable_parameters:>10,} "
            f"{size:>14} {1000 * s.median_step_s:>8.0f} {s.peak_memory_mib:>17.0f}"
        )
    return "\n".join(lines)


def multi_lines(m: MultiResult) -> str:
    """The multi-adapter check: the mixed batches, memory and file sizes, a few lines."""
    rows = ", ".join(f"{n:,} {name}" for name, n in m.rows.items())
    verdict = "equal" if m.ok else "DIFFER"
    accuracy = ", ".join(f"{task} {a:.4f}" for task, a in m.accuracy.items())
    b_bytes = " + ".join(f"{b:,}" for b in m.b_bytes.values())
    files = m.files
    asym_files = " + ".join(f"{files[f'{t}.safetensors']:,}" for t in m.b_bytes)
    peft_files = " + ".join(f"{files[f'peft-{t}/adapter_model.safetensors']:,}" for t in m.b_bytes)
    heads = " and ".join(f"{files[f'{t}-head.safetensors']:,}" for t in m.b_bytes)
    ratio = m.asymlora_bytes / m.peft_bytes
    return "\n".join(
        [
            f"  mixed batches: {m.predictions_total:,} rows ({rows}) in {m.batches} batches "
            f"of up to {m.batch_size}, {m.mixed_batches} holding all three kinds",
            f"  each row vs its single-adapter model: predictions {verdict} "
            f"{m.predictions_equal}/{m.predictions_total}, max |logit difference| "
            f"{m.max_logit_difference:.2e} (tolerance {m.tolerance:.0e}; an adapter moves "
            f"every row's logits by at least {m.smallest_adapter_effect:.2e})",
            f"  accuracy in the mixed batches: {accuracy}",
            f"  A: one tensor shared by both adapters in {m.shared_a_layers}/{m.layers} "
            "layers, so x·Aᵀ is computed once per layer for the whole batch",
            f"  memory of both adapters: {m.asymlora_bytes:,} bytes (B {b_bytes}, A "
            f"{m.a_bytes:,} once); as two PEFT adapters (an A and a B each): "
            f"{m.peft_bytes:,} bytes measured in PEFT ({m.peft_bytes_from_shapes:,} from "
            f"the shapes): {ratio:.2f}x",
            f"  files: seed-plus-B {asym_files} bytes; as PEFT {peft_files} bytes; "
            f"each task's head apart: {heads} bytes",
        ]
    )


def plot(summaries: list[MethodSummary], runs: list[RunResult], path: Path) -> None:
    """Accuracy vs trainable parameters, and smoothed training-loss curves, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in summaries:
        left.errorbar(
            s.trainable_parameters,
            s.accuracy,
            yerr=s.spread or 0.0,
            fmt="o",
            capsize=3,
            label=f"{s.method} ({s.trainable_parameters:,})",
        )
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log scale)")
    left.set_ylabel("accuracy on held-out movies")
    left.set_title("accuracy vs trainable parameters")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    for s in summaries:
        curve = _mean_curve([r.losses for r in runs if r.method == s.method])
        right.plot(range(1, len(curve) + 1), _smooth(curve), label=s.method)
    right.set_xlabel("step")
    right.set_ylabel("training loss (moving average)")
    right.set_title("training loss")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves)]


def _smooth(values: list[float], window: int = 20) -> list[float]:
    window = max(1, min(window, len(values) // 5 or 1))
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
