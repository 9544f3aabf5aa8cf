"""The fine-tuning methods the demo compares, and how each saves what it trained.

Every method adapts the same modules with the same rank and trains the same fresh
classifier head; they differ only in which low-rank factor is trained.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from asymlora.demo.data import DemoDataError
from asymlora.demo.model import QUANTIZED_INSTALL, quantize_encoder

if TYPE_CHECKING:
    from torch import nn

#: every linear layer of the encoder (the pooler and the head are left out)
TARGETS = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
HEAD = "classifier"
RANK = 8
ALPHA = 16


@dataclass(frozen=True)
class Method:
    """A named way to fine-tune: what is trained, at which rank, with which learning rate."""

    name: str
    about: str
    #: "B" | "AB" | "A" for asymlora, "peft" for PEFT LoRA, "head" for the head alone
    kind: str
    #: learning rates tried by ``asymlora demo --sweep``
    sweep: tuple[float, ...]
    #: the sweep's pick (see "How the learning rates were chosen" in docs/demo.md)
    learning_rate: float
    rank: int = RANK
    #: QLoRA: the encoder's ``TARGETS`` in 4-bit NF4 (bitsandbytes) under the adapters
    quantized: bool = False

    @property
    def alpha(self) -> int:
        """Keeps ``alpha / r`` (the update's scale) the same at every rank."""
        return ALPHA * self.rank // RANK


LORA_SWEEP = (3e-4, 1e-3, 3e-3, 1e-2)
HEAD_SWEEP = (1e-3, 3e-3, 1e-2, 3e-2)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("asymlora-B", "A random orthogonal, frozen; B trained", "B", LORA_SWEEP, 1e-3),
        Method("asymlora-AB", "classic LoRA: Kaiming A and B trained", "AB", LORA_SWEEP, 1e-3),
        Method("asymlora-A", "B random orthogonal, frozen; A trained", "A", LORA_SWEEP, 1e-3),
        Method("peft-lora", "PEFT LoRA (external reference)", "peft", LORA_SWEEP, 1e-3),
        Method("head-only", "frozen encoder, classifier head trained", "head", HEAD_SWEEP, 3e-2),
        # not run by default: B-only with the trainable-parameter budget of classic LoRA
        Method("asymlora-B-2r", "B-only at twice the rank", "B", LORA_SWEEP, 1e-3, rank=2 * RANK),
        # QLoRA, in --full: the float counterpart's rate (not swept on the 4-bit base)
        Method(
            "asymlora-B-4bit", "B-only on the 4-bit encoder", "B", LORA_SWEEP, 1e-3, quantized=True
        ),
        Method(
            "peft-qlora", "PEFT LoRA on the 4-bit encoder", "peft", LORA_SWEEP, 1e-3, quantized=True
        ),
    )
}
DEFAULT_METHODS = ("asymlora-B", "asymlora-AB", "asymlora-A", "peft-lora", "head-only")
QLORA_METHODS = ("asymlora-B-4bit", "peft-qlora")


def check_available(names: Sequence[str]) -> None:
    """Raises :class:`DemoDataError` before anything trains if ``names`` holds a 4-bit
    method and bitsandbytes (optional: the ``quantized`` extra) is not installed."""
    quantized = [n for n in names if METHODS[n].quantized]
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise DemoDataError(
            f"{', '.join(quantized)} need bitsandbytes: {QUANTIZED_INSTALL} "
            "(or leave them out with --methods)"
        )


def prepare(name: str, model: nn.Module, seed: int) -> nn.Module:
    """``model`` set up for method ``name``: adapters added, the right parameters trainable."""
    method = METHODS[name]
    if method.quantized:
        model = quantize_encoder(model, TARGETS)
    if method.kind == "peft":
        return _peft(model, method, seed)
    if method.kind == "head":
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith(HEAD + "."))
        return model
    return _asymlora(model, method, seed)


def _asymlora(model: nn.Module, method: Method, seed: int) -> nn.Module:
    import asymlora

    config = asymlora.LoraConfig(
        r=method.rank,
        alpha=method.alpha,
        target_modules=list(TARGETS),
        train=method.kind,
        # classic LoRA starts like PEFT's: Kaiming-uniform A, B = 0
        a_init="kaiming" if method.kind == "AB" else "orthogonal",
        seed=seed,
        modules_to_save=[HEAD],
    )
    return asymlora.wrap(model, config)


def _peft(model: nn.Module, method: Method, seed: int) -> nn.Module:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # makes the classifier a trained module_to_save
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
    )
    torch.manual_seed(seed)  # PEFT draws its Kaiming A from the global generator
    return get_peft_model(model, config)


def save_trained(name: str, model: nn.Module, directory: Path, stem: str | None = None) -> Path:
    """Writes what a user of method ``name`` would ship, named ``stem`` (default: the
    method's name); returns the file holding it."""
    directory.mkdir(parents=True, exist_ok=True)
    kind = METHODS[name].kind
    stem = name if stem is None else stem
    if kind == "peft":
        model.save_pretrained(directory / stem)
        return directory / stem / "adapter_model.safetensors"
    path = directory / f"{stem}.safetensors"
    if kind == "head":
        from safetensors.torch import save_file

        head = {
            k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(HEAD)
        }
        save_file(head, path)
    else:
        import asymlora

        asymlora.save_adapter(model, path)
    return path


def trainable_count(model: nn.Module) -> int:
    """Parameters the optimizer updates (the head included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
