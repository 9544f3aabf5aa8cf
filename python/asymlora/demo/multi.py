"""Many adapters on one base model: both tasks' B-only adapters in one model, mixed batches.

The two tasks' adapters were trained with the same seed, so in every adapted layer they
have the same regenerated ``A``: loaded by name into one model (``asymlora.load_adapter``
with ``adapter_name``), they share one ``A`` buffer and only their ``B`` take memory, and
in a mixed batch (``asymlora.per_sample_adapters``) each layer computes ``x Aᵀ`` once.

The classifier heads are per task, and a model's ``modules_to_save`` are trained in place,
not per adapter, so a model with two adapters cannot hold them. So each trained file
(seed, ``B`` and the head as full tensors: what one task ships) is split in two: the
encoder adapter (seed and ``B`` only) and the head (``classifier.weight`` and ``.bias``,
3 KB). The encoder runs each row through its adapter; the classifier is swapped, for the
mixed batches only, for :class:`RowHeads`, which gives each row its task's head (the base
rows the base model's own head). Every row's logits are then checked against what its
single-adapter model gives: a fresh model with that task's trained file alone loaded
(head included), and, for base rows, the base model with no adapter.

Runs in its own process, like the training runs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from asymlora.demo.data import Review
from asymlora.demo.methods import HEAD

if TYPE_CHECKING:
    import torch
    from torch import nn

#: the adapters' names in the shared model, task 1 then task 2
TASKS = ("sentiment", "plot")
#: the largest |logit difference| a mixed-batch row may have from its single-adapter result
TOLERANCE = 1e-4
BATCH_SIZE = 48
BASE = "base"  # how rows without an adapter (None) are named in the counts


@dataclass(frozen=True)
class MultiJob:
    """What the check needs; pickled into the worker process."""

    #: task name -> the trained adapter file (seed, B and the head)
    adapters: Mapping[str, Path]
    #: task name -> its held-out rows; the first ``rows_per_task`` of each go in
    tests: Mapping[str, list[Review]]
    rows_per_task: int
    #: the seed the base model's fresh head is drawn from (the base rows' head)
    seed: int
    out: Path
    device: str
    threads: int


@dataclass
class MultiResult:
    """What the multi-adapter check measured."""

    adapters: list[str]
    #: rows of the mixed batches per adapter name ("base": no adapter)
    rows: dict[str, int]
    batches: int
    batch_size: int
    #: batches holding rows of every adapter and base rows
    mixed_batches: int
    max_logit_difference: float
    max_logit_difference_by: dict[str, float]
    predictions_equal: int
    predictions_total: int
    tolerance: float
    #: the smallest, over the base rows, of the largest |logit difference| between the
    #: base model and the adapter's single-adapter model on the same text
    smallest_adapter_effect: float
    #: task -> accuracy of the mixed batches' predictions on that task's rows
    accuracy: dict[str, float]
    layers: int
    #: adapted layers where both adapters hold the very same A tensor
    shared_a_layers: int
    #: bytes held in memory: each adapter's B, the A tensors (each distinct one once)
    b_bytes: dict[str, int]
    a_bytes: int
    asymlora_bytes: int
    #: the same two adapters loaded into PEFT (each with its own A and B), measured
    peft_bytes: int
    #: and computed from the shapes and dtypes: sum over adapters of A and B
    peft_bytes_from_shapes: int
    #: each task's head (the same in both cases, so left out of the two totals)
    head_bytes: dict[str, int]
    #: file name -> bytes: the split encoder adapters and heads, and the PEFT exports
    files: dict[str, int]
    seconds: float

    @property
    def ok(self) -> bool:
        """Every row equals its single-adapter result within the tolerance."""
        return (
            self.max_logit_difference <= self.tolerance
            and self.predictions_equal == self.predictions_total
        )


def split_head(trained: Path, directory: Path, name: str) -> tuple[Path, Path]:
    """Writes ``trained`` as ``name.safetensors`` (seed and B: the encoder adapter, no
    full tensors) and ``name-head.safetensors`` (its full tensors, the head)."""
    from safetensors.numpy import save_file

    import asymlora

    directory.mkdir(parents=True, exist_ok=True)
    adapter = asymlora.read_adapter(trained)
    full = set(adapter.config.full_tensors)
    encoder, head = directory / f"{name}.safetensors", directory / f"{name}-head.safetensors"
    asymlora.write_adapter(
        encoder,
        replace(adapter.config, full_tensors=()),
        {k: adapter.tensors[k] for k in adapter.tensors if k not in full},
    )
    save_file({k: adapter.tensors[k] for k in sorted(full)}, str(head))
    return encoder, head


class RowHeads:
    """A mixed batch's classifier: row ``i``'s logits come from the head ``heads[names[i]]``."""

    def __init__(self, heads: Mapping[str | None, nn.Module], names: Sequence[str | None]):
        import torch

        self.heads = heads
        self.rows = {
            name: torch.tensor([i for i, n in enumerate(names) if n == name])
            for name in dict.fromkeys(names)
        }
        self.size = len(names)

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.shape[0] != self.size:
            raise ValueError(f"RowHeads: {self.size} names for a batch of {pooled.shape[0]}")
        out = None
        for name, rows in self.rows.items():
            rows = rows.to(pooled.device)
            logits = self.heads[name](pooled.index_select(0, rows))
            if out is None:
                out = logits.new_empty((self.size, logits.shape[-1]))
            out.index_copy_(0, rows, logits)
        assert out is not None
        return out


@contextmanager
def per_row_heads(
    model: nn.Module, heads: Mapping[str, nn.Module], names: Sequence[str | None]
) -> Iterator[None]:
    """Within the block, ``model``'s classifier gives row ``i`` the head ``heads[names[i]]``
    (``None``: the classifier's own weights). A forward hook replaces its output."""
    import copy

    classifier = getattr(model, HEAD)
    row_heads = RowHeads({None: copy.deepcopy(classifier), **heads}, names)
    handle = classifier.register_forward_hook(lambda module, args, output: row_heads(args[0]))
    try:
        yield
    finally:
        handle.remove()


def run(job: MultiJob) -> MultiResult:
    """Splits the heads off, loads both adapters by name into one model, runs the mixed
    batches and compares every row with its single-adapter model."""
    import torch

    import asymlora
    from asymlora.demo.model import (
        Encoded,
        class_logits,
        load_classifier,
        load_tokenizer,
        model_path,
        predicted_class,
        quiet_transformers,
    )

    start = time.perf_counter()
    torch.set_num_threads(job.threads)
    quiet_transformers()
    path = model_path()
    tokenizer = load_tokenizer(path)
    directory = job.out / "multi"
    split = {task: split_head(job.adapters[task], directory, task) for task in TASKS}

    # the rows: each task's first held-out rows, and base rows (copies of some of the
    # same texts, half from each task), shuffled together
    per_task = {task: job.tests[task][: job.rows_per_task] for task in TASKS}
    half = job.rows_per_task // 2
    sources = [(task, i) for task in TASKS for i in range(min(half, len(per_task[task])))]
    base_rows = [per_task[task][i] for task, i in sources]
    groups: dict[str | None, list[Review]] = {**per_task, None: base_rows}

    # single-adapter results: a fresh model per task with its trained file alone
    reference: dict[str | None, list[list[float]]] = {}
    for task in TASKS:
        single = asymlora.load_adapter(load_classifier(path, job.seed), job.adapters[task])
        reference[task] = class_logits(
            single.to(job.device), Encoded(groups[task], tokenizer), job.device
        )
        del single
    base = load_classifier(path, job.seed).to(job.device)
    reference[None] = class_logits(base, Encoded(base_rows, tokenizer), job.device)
    del base

    # one model, both adapters by name, from the seed-plus-B files
    model = load_classifier(path, job.seed)
    for task in TASKS:
        asymlora.load_adapter(model, split[task][0], adapter_name=task)
    model = model.to(job.device).eval()
    heads = {task: _head(split[task][1], getattr(model, HEAD)).to(job.device) for task in TASKS}

    items = [(name, i) for name, rows in groups.items() for i in range(len(rows))]
    random.Random(0).shuffle(items)
    batches = [items[i : i + BATCH_SIZE] for i in range(0, len(items), BATCH_SIZE)]
    worst = {_label(name): 0.0 for name in groups}
    equal, mixed = 0, 0
    correct = dict.fromkeys(TASKS, 0)
    for batch_items in batches:
        names = [name for name, _ in batch_items]
        reviews = [groups[name][i] for name, i in batch_items]
        batch = Encoded(reviews, tokenizer).batch(range(len(reviews))).to(job.device)
        with torch.inference_mode(), asymlora.per_sample_adapters(model, names):
            with per_row_heads(model, heads, names):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        rows = logits.logits.float().cpu().tolist()
        mixed += set(names) == set(groups)
        for (name, i), row, review in zip(batch_items, rows, reviews):
            ref = reference[name][i]
            diff = max(abs(a - b) for a, b in zip(row, ref))
            worst[_label(name)] = max(worst[_label(name)], diff)
            equal += predicted_class(row) == predicted_class(ref)
            if name is not None:
                correct[name] += predicted_class(row) == review.label

    # how far a row would be off if it went through the wrong route (its adapter's result
    # against the base model's on the same text): the tolerance has to be far below this
    effect = min(
        max(abs(a - b) for a, b in zip(reference[None][j], reference[task][i]))
        for j, (task, i) in enumerate(sources)
    )
    memory = _memory(model)
    peft_bytes, peft_files = _peft_memory(
        path, job.seed, {t: split[t][0] for t in TASKS}, directory
    )
    files = {p.name: p.stat().st_size for pair in split.values() for p in pair} | peft_files
    return MultiResult(
        adapters=asymlora.list_adapters(model),
        rows={_label(name): len(rows) for name, rows in groups.items()},
        batches=len(batches),
        batch_size=BATCH_SIZE,
        mixed_batches=mixed,
        max_logit_difference=max(worst.values()),
        max_logit_difference_by=worst,
        predictions_equal=equal,
        predictions_total=len(items),
        tolerance=TOLERANCE,
        smallest_adapter_effect=effect,
        accuracy={task: correct[task] / len(groups[task]) for task in TASKS},
        peft_bytes=peft_bytes,
        head_bytes={
            task: sum(p.numel() * p.element_size() for p in heads[task].parameters())
            for task in TASKS
        },
        files=files,
        seconds=time.perf_counter() - start,
        **memory,
    )


def _label(name: str | None) -> str:
    return BASE if name is None else name


def _head(path: Path, like: nn.Module) -> nn.Module:
    # A copy of the model's head module holding the saved head's weight and bias.
    import copy

    from safetensors.torch import load_file

    head = copy.deepcopy(like)
    tensors = load_file(str(path))
    head.load_state_dict({k.removeprefix(HEAD + "."): v for k, v in tensors.items()})
    return head.eval()


def _memory(model: nn.Module) -> dict[str, object]:
    # Bytes of the tensors the two adapters hold, each distinct A counted once (by its
    # storage), and what PEFT's layout (an A and a B per adapter) would hold.
    from asymlora.nn import lora_layers

    layers = lora_layers(model)
    b_bytes = dict.fromkeys(TASKS, 0)
    a_storage: dict[int, int] = {}
    shared, separate = 0, 0
    for _, layer in layers:
        views = {task: layer.adapter(task) for task in TASKS}
        pointers = set()
        for task, view in views.items():
            b_bytes[task] += _nbytes(view.lora_B)
            a = view.lora_A
            a_storage[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
            pointers.add(a.data_ptr())
            separate += _nbytes(a) + _nbytes(view.lora_B)
        shared += len(pointers) == 1
    a_bytes = sum(a_storage.values())
    return {
        "layers": len(layers),
        "shared_a_layers": shared,
        "b_bytes": b_bytes,
        "a_bytes": a_bytes,
        "asymlora_bytes": sum(b_bytes.values()) + a_bytes,
        "peft_bytes_from_shapes": separate,
    }


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _peft_memory(
    path: Path, seed: int, adapters: Mapping[str, Path], directory: Path
) -> tuple[int, dict[str, int]]:
    # Both adapters exported as PEFT directories and loaded into one PeftModel by name;
    # the bytes of its LoRA parameters, and the exported files' sizes.
    import warnings

    import asymlora
    from asymlora.demo.model import load_classifier

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside PEFT
    from peft import PeftModel

    exported = {
        task: asymlora.export_peft(file, directory / f"peft-{task}", overwrite=True)
        for task, file in adapters.items()
    }
    first, *rest = exported
    peft_model = PeftModel.from_pretrained(
        load_classifier(path, seed), exported[first], adapter_name=first
    )
    for task in rest:
        peft_model.load_adapter(exported[task], adapter_name=task)
    held = sum(
        _nbytes(p) for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    )
    files = {
        f"peft-{task}/adapter_model.safetensors": (d / "adapter_model.safetensors").stat().st_size
        for task, d in exported.items()
    }
    return held, files
