"""The torch layer: wrapping, math against float64 references, saved tensors, merge, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _measure import saved_activation_bytes  # noqa: E402
from _models import LLAMA_TARGETS, tiny_gpt2, tiny_llama  # noqa: E402
from torch import nn  # noqa: E402

import asymlora  # noqa: E402
from asymlora import LoraConfig, LoraLayer  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402


def randomize_b(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def ids(batch=2, seq=12, vocab=128, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def single_layer(train="B", d_in=48, d_out=40, r=6, bias=True, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(d_in, d_out, bias=bias, dtype=dtype))
    asymlora.wrap(model, LoraConfig(r=r, alpha=12, target_modules=["proj"], train=train, **kw))
    return model, model.proj


# --- public names --------------------------------------------------------------------------


def test_every_public_name_resolves():
    for name in asymlora.__all__:
        assert getattr(asymlora, name) is not None, name
    for name in asymlora.nn.__all__:
        assert getattr(asymlora.nn, name) is not None, name
    from asymlora.nn.distributed.fingerprint import check_ranks
    from asymlora.nn.wrap import merge_adapter

    assert asymlora.merge_adapter is merge_adapter and asymlora.check_ranks is check_ranks


def test_old_distributed_module_re_exports_the_same_objects():
    from asymlora import distributed
    from asymlora.nn import distributed as home

    assert distributed.__all__ == home.__all__
    assert all(getattr(distributed, n) is getattr(home, n) for n in home.__all__)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "LoraConfig.r"),
        ({"train": "C"}, "LoraConfig.train"),
        ({"a_init": "gaussian"}, "LoraConfig.a_init"),
        ({"dropout": 1.0}, "LoraConfig.dropout"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "q_proj("}, "not a valid regex"),
        ({"seed": -1}, "LoraConfig.seed"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"train": "A", "a_init": "kaiming"}, "train='A'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LoraConfig(**kwargs)


def test_config_patterns_follow_peft_rules():
    config = LoraConfig(r=8, alpha=16, rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 4})
    assert config.rank_for("model.layers.0.mlp.down_proj") == 4
    assert config.rank_for("model.layers.0.mlp.up_proj") == 8
    assert config.scale_for("model.layers.0.self_attn.q_proj") == 4 / 8
    assert config.scale_for("model.layers.0.mlp.down_proj") == 16 / 4
    assert LoraConfig(r=16, alpha=8, rslora=True).scale_for("x") == 8 / 4
    regex = LoraConfig(target_modules=r".*layers\.1\..*_proj")
    assert regex.targets("model.layers.1.self_attn.q_proj")
    assert not regex.targets("model.layers.0.self_attn.q_proj")
    assert LoraConfig(target_modules=["q_proj"]).targets("a.q_proj")
    assert not LoraConfig(target_modules=["q_proj"]).targets("a.xq_proj")


# --- wrapping ------------------------------------------------------------------------------


def test_wrap_llama_starts_at_the_base_model_and_trains_only_b():
    model = tiny_llama()
    x = ids()
    before = model(x).logits
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, seed=7))
    assert torch.equal(model(x).logits, before)  # B = 0: the adapter starts as a no-op
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_B" for n, _ in layers}
    summary = asymlora.trainable_parameters(model)
    assert summary.trainable == sum(layer.d_out * 4 for _, layer in layers)
    assert summary.frozen_factors == sum(layer.d_in * 4 for _, layer in layers)
    assert "trainable params:" in str(summary)
    # frozen A: a buffer the state dict does not carry, equal to the generator's output
    state = model.state_dict()
    assert not any(k.endswith("lora_A") for k in state)
    for name, layer in layers:
        assert "lora_A" in dict(layer.named_buffers(recurse=False))
        expected = asymlora.random_orthogonal(4, layer.d_in, seed=7, stream=layer.stream)
        assert np.array_equal(layer.lora_A.numpy(), expected), name
    assert [layer.stream for _, layer in layers] == list(range(14))


def test_wrap_errors_change_nothing():
    model = tiny_llama()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"did you mean 'q_proj'"):
        asymlora.wrap(model, LoraConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match=r"rank 65 exceeds"):
        asymlora.wrap(model, LoraConfig(r=65, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"RMSNorm is not supported"):
        asymlora.wrap(model, LoraConfig(target_modules=["input_layernorm", "q_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\]"):
        asymlora.wrap(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        asymlora.wrap(model, {"r": 4})
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k])
    asymlora.wrap(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already wrapped"):
        asymlora.wrap(model, LoraConfig(target_modules=["v_proj"]))


def test_all_linear_skips_the_output_head_and_modules_to_save():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=2, target_modules="all-linear"))
    names = {n for n, _ in lora_layers(model)}
    assert len(names) == 14 and "lm_head" not in names


@pytest.mark.parametrize("saved", ["q_proj", "layers.1", "self_attn"])
def test_modules_to_save_may_not_overlap_adapters(saved):
    model = tiny_llama()
    with pytest.raises(ValueError, match="overlap adapted modules"):
        asymlora.wrap(model, LoraConfig(target_modules=["q_proj"], modules_to_save=[saved]))
    assert not asymlora.nn.is_wrapped(model)


def test_modules_to_save_stay_trainable():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad


def test_unwrap_without_merge_gives_back_the_base_model():
    model = tiny_llama()
    x = ids()
    reference = model(x).logits
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_b(model)
    assert not torch.equal(model(x).logits, reference)
    asymlora.unwrap(model, merge=False)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not hasattr(model, "asymlora_config")
    assert torch.equal(model(x).logits, reference)


# --- math against independent references ----------------------------------------------------


@pytest.mark.parametrize("train", ["B", "A", "AB"])
def test_forward_and_gradients_match_a_dense_float64_reference(train):
    model, layer = single_layer(train=train)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.2)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    x = torch.randn(3, 5, 48, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 5, 40, generator=gen)
    y = model(x)
    y.backward(grad_out)

    # reference: dense W + s*B@A in float64, gradients by the textbook formulas
    W = layer.base_layer.weight.double()
    bias = layer.base_layer.bias.double()
    A, B, s = layer.lora_A.double(), layer.lora_B.double(), layer.scale
    xd, g = x.detach().double().reshape(-1, 48), grad_out.double().reshape(-1, 40)
    y_ref = xd @ (W + s * B @ A).T + bias
    assert s == 12 / 6
    torch.testing.assert_close(y.double().reshape(-1, 40), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double().reshape(-1, 48), g @ (W + s * B @ A), rtol=1e-5, atol=1e-5
    )
    if train in ("B", "AB"):
        torch.testing.assert_close(
            layer.lora_B.grad.double(), s * g.T @ (xd @ A.T), rtol=1e-5, atol=1e-5
        )
    if train in ("A", "AB"):
        torch.testing.assert_close(
            layer.lora_A.grad.double(), s * (g @ B).T @ xd, rtol=1e-5, atol=1e-5
        )
    assert layer.base_layer.weight.grad is None


def test_a_hook_on_the_base_layer_sees_the_base_output():
    model, layer = single_layer()
    randomize_b(model)
    x = torch.randn(3, 48)
    seen = {}
    layer.base_layer.register_forward_hook(lambda m, a, out: seen.update(y=out))
    y = model(x)
    torch.testing.assert_close(seen["y"], layer.base_layer(x))
    assert not torch.equal(y, seen["y"])


def test_frozen_a_keeps_only_x_a_t_for_backward():
    n, d_in, d_out, r = 64, 256, 128, 8
    x = torch.randn(n, d_in, requires_grad=True)

    model_b, _ = single_layer("B", d_in, d_out, r, bias=False)
    saved_b, shapes_b = saved_activation_bytes(model_b, x)
    frozen = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    assert saved_activation_bytes(frozen, x) == (0, [])

    # train="B": autograd keeps exactly one new tensor, x A^T (n x r)
    assert shapes_b == [(n, r)]
    assert saved_b == n * r * 4

    # classic LoRA also keeps the layer input (dropout(x), n x d_in) for A's gradient: with
    # dropout it is a new n x d_in tensor
    model_ab, _ = single_layer("AB", d_in, d_out, r, bias=False, dropout=0.1)
    saved_ab, shapes_ab = saved_activation_bytes(model_ab, x)
    assert (n, d_in) in shapes_ab
    assert saved_ab >= n * d_in * 4


def test_dropout_applies_to_the_adapter_branch_only():
    model, layer = single_layer(dropout=0.5)
    randomize_b(model)
    x = torch.randn(4, 48)
    model.eval()
    y_eval = model(x)
    assert torch.equal(y_eval, model(x))
    model.train()
    assert not torch.equal(model(x), y_eval)
    with torch.no_grad():
        torch.manual_seed(11)
        y = model(x)
        torch.manual_seed(11)
        dropped = torch.nn.functional.dropout(x, 0.5, training=True)
        expected = layer.base_layer(x) + layer.scale * (dropped @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_kaiming_a_is_seeded_and_stored():
    _, layer = single_layer(train="AB", a_init="kaiming", seed=3)
    _, again = single_layer(train="AB", a_init="kaiming", seed=3)
    assert isinstance(layer.lora_A, nn.Parameter)
    assert torch.equal(layer.lora_A, again.lora_A)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(48)
    assert not layer.a_regenerated
    _, frozen = single_layer(train="B", a_init="kaiming")
    assert "lora_A" in frozen.state_dict()  # not regenerable: persistent


def test_train_a_freezes_a_random_orthonormal_b():
    _, layer = single_layer(train="A", seed=4)
    assert isinstance(layer.lora_A, nn.Parameter) and not layer.lora_A.any()
    assert not isinstance(layer.lora_B, nn.Parameter)
    b = layer.lora_B.double()
    torch.testing.assert_close(b.T @ b, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


# --- merge ---------------------------------------------------------------------------------


def test_merge_matches_the_adapter_and_unmerge_restores():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_b(model)
    x = ids()
    adapted = model(x).logits
    asymlora.merge_adapter(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
    asymlora.unmerge_adapter(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
    asymlora.unwrap(model, merge=True)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("old", "new"), [("merge", "merge_adapter"), ("unmerge", "unmerge_adapter")]
)
def test_merge_and_unmerge_remain_as_deprecated_aliases(old, new):
    model, layer = single_layer()
    randomize_b(model)
    if old == "unmerge":
        asymlora.merge_adapter(model)
    with pytest.warns(DeprecationWarning, match=f"asymlora.{new}") as caught:
        assert getattr(asymlora, old)(model) is model
    assert caught[0].filename == __file__  # points at the caller
    assert layer.merged == (old == "merge")
    assert getattr(asymlora.nn, old) is getattr(asymlora, old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_rounds_once_to_the_weight_dtype(dtype):
    model, layer = single_layer(dtype=dtype)
    randomize_b(model)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.scale * (layer.lora_B.double() @ layer.lora_A.double())
    asymlora.merge_adapter(model)
    merged = layer.base_layer.weight
    expected = (w0.float() + delta.float()).to(dtype)
    assert torch.equal(merged, expected)
    # one rounding: equal to the float64 truth rounded to dtype, but where float32
    # accumulation lands on the other side of a tie (then off by one ulp)
    exact = w0.double() + delta
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - 1 - mantissa_bits)
    err = (merged.double() - exact).abs()
    assert bool((err <= ulp).all())
    assert (merged == exact.to(dtype)).double().mean() > 0.99


def test_gpt2_conv1d_layers_wrap_and_merge():
    model = tiny_gpt2()
    x = ids(vocab=64)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    layers = lora_layers(model)
    assert all(layer.fan_in_fan_out for _, layer in layers)
    attn = model.transformer.h[0].attn.c_attn
    assert (attn.d_in, attn.d_out) == (32, 96)
    randomize_b(model)
    # the adapted Conv1D equals x (W + (s B A)^T) + b with W stored d_in x d_out
    h = torch.randn(2, 5, 32)
    W, b = attn.base_layer.weight.double(), attn.base_layer.bias.double()
    ref = h.double() @ (W + attn.scale * (attn.lora_B.double() @ attn.lora_A.double()).T) + b
    torch.testing.assert_close(attn(h).double(), ref, rtol=1e-5, atol=1e-5)
    adapted = model(x).logits
    asymlora.merge_adapter(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)


# --- dtypes, autocast, compile --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_float32_master_b_and_trains(dtype):
    model = tiny_llama(dtype=dtype)
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    _, layer = lora_layers(model)[0]
    assert layer.lora_A.dtype == dtype
    assert layer.lora_B.dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
    optimizer.step()
    assert layer.lora_B.abs().sum() > 0


def test_autocast_on_cpu():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_b(model)
    x = ids()
    reference = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    _, layer = lora_layers(model)[0]
    assert layer.lora_B.grad is not None
    torch.testing.assert_close(out.logits.float(), reference, rtol=0.1, atol=0.1)


def test_torch_compile_has_no_graph_breaks_in_the_layer():
    _, layer = single_layer()
    x = torch.randn(4, 7, 48)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


# --- norm report ---------------------------------------------------------------------------


def test_norm_report_matches_direct_computation():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_b(model)
    x = ids(seq=16)
    captured = {}
    attn = model.model.layers[0].self_attn
    handle = attn.q_proj.register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
    report = asymlora.norm_report(model, {"input_ids": x})
    handle.remove()
    hidden = captured["x"].detach()
    row = report.rows[0]
    assert row.layer == "model.layers.0.self_attn"
    assert row.q_base == pytest.approx(attn.q_proj.base_layer(hidden).abs().max().item())
    with torch.no_grad():
        assert row.q_adapted == pytest.approx(attn.q_proj(hidden).abs().max().item())
        assert row.k_base == row.k_adapted == pytest.approx(attn.k_proj(hidden).abs().max().item())
    assert row.q_adapted != row.q_base
    assert report.seq_len == 16 and report.threshold == pytest.approx(math.sqrt(math.log(16)))
    assert len(report.rows) == 2 and "sqrt(log L)" in str(report)
    assert report.to_dict()["rows"][1]["layer"] == "model.layers.1.self_attn"


def test_norm_report_splits_gpt2_fused_qkv():
    model = tiny_gpt2()
    x = ids(vocab=64)
    report = asymlora.norm_report(model, x)
    captured = {}
    c_attn = model.transformer.h[0].attn.c_attn
    handle = c_attn.register_forward_hook(lambda m, a, o: captured.update(y=o))
    model(x)
    handle.remove()
    q, k, _ = captured["y"].detach().abs().split(32, dim=-1)
    assert report.rows[0].q_base == pytest.approx(q.max().item())
    assert report.rows[0].k_base == pytest.approx(k.max().item())


def test_norm_report_refuses_merged_adapters():
    model = tiny_llama()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=["q_proj"]))
    asymlora.merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge"):
        asymlora.norm_report(model, ids())


# --- CUDA ----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    cpu = tiny_llama()
    asymlora.wrap(cpu, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_b(cpu)
    gpu = tiny_llama()
    asymlora.wrap(gpu, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomize_b(gpu)
    gpu = gpu.to("cuda", dtype)
    _, layer = lora_layers(gpu)[0]
    assert layer.lora_A.device.type == "cuda"
    x = ids()
    out_cpu = cpu(x, labels=x)
    out_gpu = gpu(x.cuda(), labels=x.cuda())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out_gpu.logits.float().cpu(), out_cpu.logits, rtol=tol, atol=tol)
    out_gpu.loss.backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.device.type == "cuda"
    asymlora.merge_adapter(gpu)
    merged = gpu(x.cuda()).logits.float().cpu()
    torch.testing.assert_close(merged, out_cpu.logits, rtol=tol * 5, atol=tol * 5)


@pytest.mark.cuda
@cuda
def test_cuda_wrap_puts_a_on_the_layer_device():
    model = tiny_llama().cuda()
    asymlora.wrap(model, LoraConfig(r=4, target_modules=["q_proj"], seed=9))
    _, layer = lora_layers(model)[0]
    expected = asymlora.random_orthogonal(4, 64, seed=9, stream=0)
    assert np.array_equal(layer.lora_A.cpu().numpy(), expected)
    assert layer.lora_B.device.type == "cuda"
