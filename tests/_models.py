"""Small transformers models built from configs (no downloads), shared by the torch tests."""

from __future__ import annotations

import torch
import transformers

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64):
    """A 2-layer Llama (GQA, untied head, vocab 128), weights from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D projections), in eval mode so dropout does not vary outputs."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def quantize_torchao(model, skip: tuple[str, ...] = ("lm_head",)):
    """Quantises ``model``'s linear layers (but ``skip``) in place with torchao's int8
    weight-only quantisation (``quantize_(model, Int8WeightOnlyConfig())``)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def chosen(module, name):
        return isinstance(module, torch.nn.Linear) and name not in skip

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=chosen)
    return model
