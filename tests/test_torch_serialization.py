"""save_adapter / load_adapter: file contents, bit-exact reload in another process, refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _models import LLAMA_TARGETS, tiny_llama  # noqa: E402

import asymlora  # noqa: E402
from asymlora import AdapterMismatchError, LoraConfig  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402

TARGETS = LLAMA_TARGETS


def base_model(hidden: int = 64):
    return tiny_llama(hidden=hidden)


def train(model, steps: int = 3) -> torch.Tensor:
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return x


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    base_model().save_pretrained(path)
    return path


def test_b_only_file_holds_b_and_the_seed(tmp_path):
    model = base_model()
    asymlora.wrap(model, LoraConfig(r=8, alpha=16, target_modules=TARGETS, seed=42))
    train(model)
    path = tmp_path / "adapter.safetensors"
    asymlora.save_adapter(model, path)
    adapter = asymlora.read_adapter(path)
    layers = dict(lora_layers(model))
    assert set(adapter.tensors) == {f"{n}.lora_B" for n in layers}
    assert adapter.config.seed == 42 and adapter.config.rank == 8
    for name, layer in layers.items():
        assert np.array_equal(adapter.lora_B(name), layer.lora_B.detach().numpy())
        assert np.array_equal(adapter.lora_A(name), layer.lora_A.numpy())
        assert adapter.config.modules[name].stream == layer.stream
        assert adapter.config.scale(name) == layer.scale
    # every A stored (classic LoRA): B-only is about half
    assert adapter.file_size / adapter.classic_lora_size < 0.55


def test_reload_in_another_process_is_bit_exact(tmp_path, base_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(
        model,
        LoraConfig(
            r=8,
            target_modules=TARGETS,
            seed=5,
            modules_to_save=["lm_head"],
            rank_pattern={"down_proj": 4},
            alpha_pattern={"q_proj": 4.0},
        ),
    )
    x = train(model)
    model.eval()
    expected = model(x).logits.detach()
    torch.save({"x": x, "logits": expected}, tmp_path / "expected.pt")
    asymlora.save_adapter(model, tmp_path / "adapter.safetensors")
    script = textwrap.dedent(
        f"""
        import torch, transformers, asymlora
        model = transformers.LlamaForCausalLM.from_pretrained({str(base_dir)!r}).eval()
        asymlora.load_adapter(model, {str(tmp_path / "adapter.safetensors")!r})
        data = torch.load({str(tmp_path / "expected.pt")!r})
        logits = model(data["x"]).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        print("bit-exact")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "bit-exact"


@pytest.mark.parametrize(
    ("train_mode", "a_init"), [("AB", "orthogonal"), ("A", "orthogonal"), ("B", "kaiming")]
)
def test_stored_a_round_trips(tmp_path, base_dir, train_mode, a_init):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], train=train_mode, a_init=a_init)
    )
    x = train(model)
    expected = model(x).logits
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    adapter = asymlora.read_adapter(tmp_path / "a.safetensors")
    assert all(m.a_stored for m in adapter.config.modules.values())
    fresh = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x).logits, expected)


def test_load_trainable_continues_training(tmp_path, base_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=TARGETS))
    train(model, steps=1)
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    frozen = asymlora.load_adapter(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "a.safetensors"
    )
    assert asymlora.trainable_parameters(frozen).trainable == 0
    resumed = asymlora.load_adapter(
        transformers.LlamaForCausalLM.from_pretrained(base_dir),
        tmp_path / "a.safetensors",
        is_trainable=True,
    )
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n, _ in lora_layers(resumed)}
    asymlora.save_adapter(resumed, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_load_into_a_wrapped_model(tmp_path, base_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=TARGETS, seed=3))
    x = train(model)
    expected = model(x).logits
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    other = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(other, LoraConfig(r=4, target_modules=TARGETS, seed=3))
    asymlora.load_adapter(other, tmp_path / "a.safetensors")
    assert torch.equal(other(x).logits, expected)

    wrong_seed = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(wrong_seed, LoraConfig(r=4, target_modules=TARGETS, seed=4))
    before = wrong_seed(x).logits
    with pytest.raises(AdapterMismatchError, match=r"seed 4, stream 0.*seed 3, stream 0"):
        asymlora.load_adapter(wrong_seed, tmp_path / "a.safetensors")
    assert torch.equal(wrong_seed(x).logits, before)

    fewer = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    asymlora.wrap(fewer, LoraConfig(r=4, target_modules=["q_proj"], seed=3))
    with pytest.raises(AdapterMismatchError, match="adapted modules differ"):
        asymlora.load_adapter(fewer, tmp_path / "a.safetensors")


def test_mismatched_model_is_refused_and_unchanged(tmp_path):
    model = base_model()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    asymlora.save_adapter(model, tmp_path / "a.safetensors")

    smaller = base_model(hidden=32)
    state = {k: v.clone() for k, v in smaller.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"nothing was changed") as err:
        asymlora.load_adapter(smaller, tmp_path / "a.safetensors")
    assert "self_attn.q_proj: model is 32x32 (d_out x d_in), adapter 64x64" in str(err.value)
    assert not asymlora.nn.is_wrapped(smaller)
    assert all(p.requires_grad for p in smaller.parameters())
    assert all(torch.equal(v, state[k]) for k, v in smaller.state_dict().items())

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0
        )
    )
    with pytest.raises(AdapterMismatchError, match="no such module in GPT2LMHeadModel"):
        asymlora.load_adapter(gpt2, tmp_path / "a.safetensors")


def test_unwrapped_model_has_no_adapter_to_save(tmp_path):
    with pytest.raises(ValueError, match="not wrapped"):
        asymlora.save_adapter(base_model(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_bfloat16_model_round_trip(tmp_path):
    model = base_model().to(torch.bfloat16)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=TARGETS))
    x = train(model, steps=2)
    expected = model(x).logits
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = base_model().to(torch.bfloat16)
    asymlora.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(x).logits, expected)
