"""Adapters on quantised base layers (QLoRA): bitsandbytes 4-bit (NF4, FP4) and 8-bit, and
torchao int8 weight-only, all on the CPU, against float64 references and real PEFT."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import peft
import pytest
import torch
from _measure import saved_activation_bytes
from _models import LLAMA_TARGETS, quantize_torchao, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import asymlora
from asymlora import LoraConfig, QuantizedBaseError, quantize_bnb
from asymlora.nn import lora_layers
from asymlora.nn.base import float_weight, info

bnb = pytest.importorskip("bitsandbytes")

#: name -> (how to quantise a fresh tiny Llama, its dtype)
KINDS = {
    "nf4": (
        lambda m: quantize_bnb(m, 4, quant_type="nf4", compute_dtype=torch.float32),
        torch.float32,
    ),
    "fp4-bf16": (
        lambda m: quantize_bnb(
            m, 4, quant_type="fp4", compute_dtype=torch.bfloat16, double_quant=False
        ),
        torch.bfloat16,
    ),
    "int8": (lambda m: quantize_bnb(m, 8), torch.float32),
    "torchao-int8": (quantize_torchao, torch.float32),
}
KIND_OF = {"nf4": "bnb-4bit", "fp4-bf16": "bnb-4bit", "int8": "bnb-8bit", "torchao-int8": "torchao"}


def quantized_llama(kind: str, seed: int = 0):
    quantize, dtype = KINDS[kind]
    return quantize(tiny_llama(seed, dtype=dtype))


def ids(batch=2, seq=10, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed: int = 1, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def loss_of(model, x):
    logits = model(input_ids=x).logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))


# --- wrapping and forward ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_linear_adapts_every_quantized_projection_and_adds_the_branch(kind):
    model = quantized_llama(kind)
    asymlora.wrap(model, LoraConfig(r=4, target_modules="all-linear", seed=7))
    layers = dict(lora_layers(model))
    assert len(layers) == 2 * len(LLAMA_TARGETS)  # every projection, not the head
    assert not any(name.endswith("lm_head") for name in layers)
    randomize_b(model)
    layer = layers["model.layers.0.mlp.down_proj"]
    base = info(layer.base_layer)
    assert base.kind == KIND_OF[kind] and (layer.d_in, layer.d_out) == (96, 64)
    _, dtype = KINDS[kind]
    assert layer.lora_A.dtype == dtype and layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 5, 96, dtype=dtype)
    with torch.no_grad():
        got = layer(x).double()
        branch = (x.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T
        want = layer.base_layer(x).double() + layer.scale * branch
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("train", ["B", "A", "AB"])
def test_training_reaches_the_trained_factors_of_every_layer(kind, train):
    model = quantized_llama(kind)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, train=train, seed=7))
    if train != "A":
        randomize_b(model)  # else A's gradient is zero at the start
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=5e-3)
    x = ids()
    losses = []
    for _ in range(4):
        loss = loss_of(model, x)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for name, layer in lora_layers(model):
            for factor, tensor in layer.adapter().factors():
                is_trained = factor[-1] in train
                assert (tensor.grad is not None) == is_trained, (name, factor)
                if is_trained:  # layer 0 too: the gradient flows through the quantised base
                    assert tensor.grad.abs().sum() > 0, (name, factor)
        optimizer.step()
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_frozen_a_keeps_only_x_a_t_for_backward_on_a_4bit_layer():
    n, d_in, d_out, r = 64, 256, 128, 8
    torch.manual_seed(0)
    model = quantize_bnb(nn.Sequential(nn.Linear(d_in, d_out, bias=False)))
    x = torch.randn(n, d_in, requires_grad=True)
    base_bytes, _ = saved_activation_bytes(model, x)
    # B-only: x A^T (n x r) beyond what the 4-bit base keeps
    wrapped = quantize_bnb(nn.Sequential(nn.Linear(d_in, d_out, bias=False)))
    asymlora.wrap(wrapped, LoraConfig(r=r, target_modules=["0"], train="B"))
    total, shapes = saved_activation_bytes(wrapped, x)
    assert total - base_bytes == n * r * 4, shapes
    # classic LoRA also keeps dropout(x) (n x d_in) for A's gradient
    wrapped = quantize_bnb(nn.Sequential(nn.Linear(d_in, d_out, bias=False)))
    asymlora.wrap(wrapped, LoraConfig(r=r, target_modules=["0"], train="AB", dropout=0.1))
    total, shapes = saved_activation_bytes(wrapped, x)
    assert (n, d_in) in shapes and total - base_bytes >= n * d_in * 4


# --- against PEFT's QLoRA ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_outputs_and_b_gradients_equal_peft_qlora_on_the_same_quantized_model(kind, tmp_path):
    ours = quantized_llama(kind)
    asymlora.wrap(ours, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS, seed=5))
    randomize_b(ours)
    asymlora.save_adapter(ours, tmp_path / "a.safetensors")
    peft_dir = asymlora.export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(quantized_llama(kind), str(peft_dir), is_trainable=True)
    x = ids()
    loss_ours, loss_theirs = loss_of(ours, x), loss_of(theirs, x)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7
        )


# --- files ---------------------------------------------------------------------------------

_RELOAD = """
import sys, hashlib, torch
sys.path.insert(0, {tests!r})
from test_quantized import quantized_llama
import asymlora
model = quantized_llama({kind!r})
asymlora.load_adapter(model, {path!r})
x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    print(hashlib.sha256(model(input_ids=x).logits.float().numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_trained_on_a_quantized_base_reloads_bit_for_bit_in_a_fresh_process(kind, tmp_path):
    model = quantized_llama(kind)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
    _train(model, steps=3)
    path = tmp_path / "qlora.safetensors"
    asymlora.save_adapter(model, path)
    assert not any("weight" in k and "lora" not in k for k in load_file(path))  # B only
    with torch.no_grad():
        logits = model(input_ids=ids()).logits.float()
    expected = hashlib.sha256(logits.numpy().tobytes()).hexdigest()
    script = _RELOAD.format(tests=str(_tests_dir()), kind=kind, path=str(path))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[-1] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_trained_on_4bit_loads_onto_a_float_base(tmp_path, dtype):
    model = quantized_llama("nf4")
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
    _train(model, steps=3)
    asymlora.save_adapter(model, tmp_path / "q.safetensors")
    float_model = asymlora.load_adapter(tiny_llama(0, dtype=dtype), tmp_path / "q.safetensors")
    for (name, q), (_, f) in zip(lora_layers(model), lora_layers(float_model)):
        assert torch.equal(q.lora_B.detach(), f.lora_B.detach()), name  # float32 masters
        assert torch.equal(q.lora_A.to(f.lora_A.dtype), f.lora_A), name
    with torch.no_grad():
        q_logits, f_logits = model(input_ids=ids()).logits, float_model(input_ids=ids()).logits
    # The float base is not the 4-bit one: the logits differ by its quantisation error,
    # large for a tiny model of random weights (about 11% of the largest logit here).
    assert (q_logits - f_logits.float()).abs().max() < 0.25 * q_logits.abs().max()


def test_4bit_adapter_merges_offline_into_the_float_checkpoint(tmp_path):
    save_file(tiny_llama(0).state_dict(), tmp_path / "base.safetensors")
    model = quantized_llama("nf4")
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
    _train(model, steps=2)
    asymlora.save_adapter(model, tmp_path / "q.safetensors")
    asymlora.merge_files(tmp_path / "base.safetensors", tmp_path / "q.safetensors", tmp_path / "m")
    merged, base = load_file(tmp_path / "m"), load_file(tmp_path / "base.safetensors")
    for name, layer in lora_layers(model):
        key = name + ".weight"
        want = (base[key].double() + layer.delta_weight().double()).float()
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-7)


def test_mixed_batch_of_adapters_on_a_4bit_base_equals_each_row_alone(tmp_path):
    model = quantized_llama("nf4")
    for i, name in enumerate(("fr", "de")):
        trained = quantized_llama("nf4")
        asymlora.wrap(trained, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
        randomize_b(trained, seed=i + 1)
        asymlora.save_adapter(trained, tmp_path / f"{name}.safetensors")
        asymlora.load_adapter(model, tmp_path / f"{name}.safetensors", adapter_name=name)
    x = ids(batch=3)
    with torch.no_grad(), asymlora.per_sample_adapters(model, ["fr", "de", None]):
        mixed = model(input_ids=x).logits
    for row, name in enumerate(("fr", "de", None)):
        with torch.no_grad():
            if name is None:
                with asymlora.disable_adapters(model):
                    alone = model(input_ids=x[row : row + 1]).logits
            else:
                asymlora.set_adapter(model, name)
                alone = model(input_ids=x[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)


# --- merging in memory ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "fp4-bf16", "int8"])
def test_merge_into_bitsandbytes_requantizes_and_says_so(kind):
    model = quantized_llama(kind)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        adapted = model(input_ids=x).logits.float()
    layers = lora_layers(model)
    expected = {n: float_weight(la.base_layer) + la.delta_weight() for n, la in layers}
    with pytest.warns(UserWarning, match="quantises again"):
        asymlora.merge_adapter(model)
    for name, layer in layers:
        assert info(layer.base_layer).kind == KIND_OF[kind]  # still quantised, in place
        # exactly W + s B A quantised as the layer was, by bitsandbytes itself
        want = _bnb_round_trip(layer.base_layer, expected[name])
        torch.testing.assert_close(float_weight(layer.base_layer), want, rtol=0, atol=0)
    with torch.no_grad():
        merged = model(input_ids=x).logits.float()
    if kind == "int8":  # at 4 bits a second rounding of a tiny random model moves the
        # logits by about a third of their size: the exact check above is the one
        assert (merged - adapted).abs().max() < 0.1 * adapted.abs().max()
    with pytest.warns(UserWarning, match="quantises again"):
        asymlora.unmerge_adapter(model)
    assert not any(layer.merged for _, layer in layers)


def _bnb_round_trip(layer, weight):
    # weight (float32) quantised and dequantised with the layer's own settings
    if isinstance(layer, bnb.nn.Linear4bit):
        old = layer.weight
        w = weight.to(old.quant_state.dtype)
        packed, state = bnb.functional.quantize_4bit(
            w,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        return bnb.functional.dequantize_4bit(packed, state).float()
    rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    return bnb.functional.int8_vectorwise_dequant(rows, scales).float()


def test_merge_into_torchao_is_refused_and_leaves_the_model_unchanged():
    model = quantized_llama("torchao-int8")
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=9))
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(QuantizedBaseError, match=r"torchao .*asymlora merge"):
        asymlora.merge_adapter(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


# --- models as users get them --------------------------------------------------------------


def test_model_loaded_with_bits_and_bytes_config_trains_in_bf16(tmp_path):
    import transformers

    tiny_llama(0).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.bfloat16
    )
    model = asymlora.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    asymlora.wrap(model, LoraConfig(r=4, target_modules="all-linear", seed=3))
    _, layer = lora_layers(model)[0]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_B.dtype == torch.float32
    model.train()
    loss = loss_of(model, ids())
    loss.backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for _, layer in lora_layers(model))


def test_prepare_model_for_kbit_training_freezes_upcasts_and_enables_input_grads():
    model = quantize_bnb(tiny_llama(0, dtype=torch.bfloat16), 4, compute_dtype=torch.bfloat16)
    prepared = asymlora.prepare_model_for_kbit_training(model)
    assert prepared is model
    assert not any(p.requires_grad for p in model.parameters())
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32  # PEFT's rule: float parameters in float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # untouched
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    embedded = model.get_input_embeddings()(ids())
    assert embedded.requires_grad  # reentrant checkpointing sees an input that needs grad


def test_quantized_layers_of_other_libraries_are_refused_by_name():
    quanto = pytest.importorskip("optimum.quanto")
    model = tiny_llama(0)
    quanto.quantize(model.model, weights=quanto.qint8)
    quanto.freeze(model.model)
    for targets in ("all-linear", LLAMA_TARGETS):
        with pytest.raises(ValueError, match=r"QLinear is a quantised layer .*bitsandbytes"):
            asymlora.wrap(model, LoraConfig(r=4, target_modules=targets))
    assert not asymlora.nn.is_wrapped(model)


def _train(model, steps: int) -> None:
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of(model, ids()).backward()
            optimizer.step()


def _tests_dir():
    return Path(__file__).resolve().parent


def test_quantize_bnb_keeps_the_head_in_float_and_checks_its_arguments():
    model = quantize_bnb(tiny_llama(0))
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.up_proj, bnb.nn.Linear4bit)
    with pytest.raises(ValueError, match="bits: 3 is not 4 or 8"):
        quantize_bnb(tiny_llama(0), 3)
    with pytest.raises(ValueError, match=r"modules: \['model.norm', 'nope'\] are not nn.Linear"):
        quantize_bnb(tiny_llama(0), modules=["lm_head", "model.norm", "nope"])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_qlora_equals_peft_and_trains(bits, tmp_path):
    def fresh():
        return quantize_bnb(tiny_llama(0, dtype=torch.bfloat16), bits, device="cuda")

    ours = fresh()
    asymlora.wrap(ours, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS, seed=5))
    randomize_b(ours)
    _, layer = lora_layers(ours)[0]
    assert layer.lora_A.device.type == "cuda" and layer.lora_B.dtype == torch.float32
    asymlora.save_adapter(ours, tmp_path / "a.safetensors")
    peft_dir = asymlora.export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(fresh(), str(peft_dir), is_trainable=True)
    x = ids().cuda()
    loss_ours, loss_theirs = loss_of(ours, x), loss_of(theirs, x)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=2e-2, atol=2e-2)
    loss_ours.backward()
    assert all(la.lora_B.grad.abs().sum() > 0 for _, la in lora_layers(ours))
