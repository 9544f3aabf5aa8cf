"""One method, one seed, one learning rate: train, evaluate, save. Runs in its own process.

A fresh process per run makes its peak memory its own (the allocator never hands
memory back to the system, so in one process every run would report the largest).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from asymlora.demo.data import Review

T = TypeVar("T")
R = TypeVar("R")

WARMUP_FRACTION = 0.06
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Job:
    """Everything a training run needs; pickled into the worker process."""

    method: str
    learning_rate: float
    seed: int
    steps: int
    batch_size: int
    train: list[Review]
    test: list[Review]
    device: str
    threads: int
    #: where to write the trained adapter and, if set, the untrained base checkpoint
    out: Path | None = None
    save_base: bool = False
    progress: bool = True
    #: the saved adapter's file name (without .safetensors) and the run's label in
    #: progress lines; None: the method's name
    adapter_name: str | None = None

    @property
    def label(self) -> str:
        """``method``, or ``adapter_name (method)`` for a named adapter."""
        return self.method if self.adapter_name is None else f"{self.adapter_name} ({self.method})"


@dataclass
class RunResult:
    """What one run measured."""

    method: str
    learning_rate: float
    seed: int
    accuracy: float
    trainable_parameters: int
    adapter_bytes: int | None
    adapter_path: str | None
    median_step_s: float
    peak_memory_mib: float
    memory_kind: str
    losses: list[float]
    logits: list[list[float]] = field(default_factory=list)


def run_in_subprocess(job: Job) -> RunResult:
    """Runs ``job`` in a fresh spawned process and returns its result."""
    return call_in_subprocess(run, job)


def call_in_subprocess(function: Callable[[T], R], argument: T) -> R:
    """``function(argument)`` in a fresh spawned process (both must pickle)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, argument).result()


def run(job: Job) -> RunResult:
    """Trains ``job.method`` on ``job.train`` and evaluates on ``job.test``."""
    import torch

    from asymlora.demo import methods
    from asymlora.demo.model import (
        Encoded,
        class_logits,
        load_classifier,
        load_tokenizer,
        model_path,
        predicted_class,
        quiet_transformers,
    )

    torch.set_num_threads(job.threads)
    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside PEFT
    path = model_path()
    tokenizer = load_tokenizer(path)
    train, test = Encoded(job.train, tokenizer), Encoded(job.test, tokenizer)
    model = load_classifier(path, job.seed)
    if job.save_base and job.out is not None:
        # the checkpoint the adapter is merged into, tokenizer included: transformers 5
        # loads a folder without tokenizer files as an empty-vocabulary tokenizer, silently
        model.save_pretrained(job.out / "base")
        tokenizer.save_pretrained(job.out / "base")
    model = methods.prepare(job.method, model, job.seed).to(job.device)
    if job.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, step_times = _train(model, train, job)
    logits = class_logits(model, test, job.device)
    predictions = [predicted_class(row) for row in logits]
    adapter = None
    if job.out is not None:
        adapter = methods.save_trained(
            job.method, model, job.out / "adapters", stem=job.adapter_name
        )
    peak, kind = _peak_memory_mib(job.device)
    return RunResult(
        method=job.method,
        learning_rate=job.learning_rate,
        seed=job.seed,
        accuracy=sum(p == y for p, y in zip(predictions, test.labels)) / len(test),
        trainable_parameters=methods.trainable_count(model),
        adapter_bytes=adapter.stat().st_size if adapter else None,
        adapter_path=str(adapter) if adapter else None,
        median_step_s=statistics.median(step_times[min(3, len(step_times) - 1) :]),
        peak_memory_mib=peak,
        memory_kind=kind,
        losses=losses,
        logits=logits,
    )


class Progress:
    """Training progress on stderr: a bar on a terminal, plain lines anywhere else.

    A progress bar redraws itself with carriage returns, which fill a log file or a pipe
    with frames. So, as ``asymlora merge`` does, the bar is shown only when the stream is
    a terminal; otherwise one line is written at every quarter of the run (and at its end).
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None) -> None:
        self.total, self.desc, self.step = total, desc, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.every = max(1, math.ceil(total / 4))
        self.start = time.perf_counter()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, unit="step")

    def update(self, loss: float) -> None:
        """One step done, with its training loss."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.step % self.every == 0 or self.step == self.total):
            seconds = time.perf_counter() - self.start
            print(
                f"  {self.desc}: step {self.step}/{self.total}, loss {loss:.3f}, {seconds:.0f} s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _train(model, data, job: Job) -> tuple[list[float], list[float]]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(job.steps))
    order = data.training_order(job.steps, job.batch_size, job.seed)
    losses, times = [], []
    model.train()
    progress = Progress(
        len(order), f"{job.label} lr={job.learning_rate:g} seed {job.seed}", enabled=job.progress
    )
    for indices in order:
        batch = data.batch(indices).to(job.device)
        start = time.perf_counter()
        output = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = output.loss.item()  # also waits for a GPU to finish the step
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{job.method}: loss is {loss} at step {len(losses)}")
        progress.update(loss)
    progress.close()
    return losses, times


def _warmup_then_linear(steps: int):
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _peak_memory_mib(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20, "GPU max allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss counts KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS"


def default_threads() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
