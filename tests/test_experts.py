"""target_parameters: MoE expert parameters of real transformers models (Mixtral,
Qwen3-MoE, gpt-oss built from configs) against float64 references and real PEFT."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from _reference import round_once

import asymlora
from asymlora.nn import lora_layers
from asymlora.nn.experts import ParametersWrapper, ParamLoraLayer

transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
VOCAB = 64


def tiny_mixtral(seed: int = 0, implementation: str = "grouped_mm"):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    model.set_experts_implementation(implementation)
    return model


def tiny_qwen3_moe(seed: int = 0, implementation: str = "grouped_mm"):
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=64,
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    model.set_experts_implementation(implementation)
    return model


def tiny_gpt_oss(seed: int = 0, implementation: str = "grouped_mm"):
    # gpt-oss stores each expert block transposed: gate_up_proj (E, H, 2I), down_proj
    # (E, I, H), with is_transposed=True on the experts module (PEFT's rule).
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # the default init leaves these at zero; make them count
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "sinks")):
                p.normal_(0, 0.02)
    model.set_experts_implementation(implementation)
    return model


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}


def ids(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def config(**kw) -> asymlora.LoraConfig:
    defaults = dict(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    return asymlora.LoraConfig(**{**defaults, **kw})


def randomize_b(model, scale: float = 0.05, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def param_layers(model) -> list[tuple[str, ParamLoraLayer]]:
    return [(n, m) for n, m in lora_layers(model) if isinstance(m, ParamLoraLayer)]


def float64_reference(base, model) -> torch.nn.Module:
    """``base`` in float64 with every adapter delta of ``model`` (wrapped from ``base``)
    added to its weight, computed here from the factors in float64."""
    ref = copy.deepcopy(base).double()
    ref.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            a, b = layer.lora_A.double(), layer.lora_B.double()
            delta = layer.scale * (b @ a)
            if isinstance(layer, ParamLoraLayer):
                target = params[name]
                target += delta.transpose(-2, -1) if layer.transposed else delta
            else:
                params[f"{name}.weight"] += delta
    return ref


# --- forward, generator, training -----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_forward_equals_float64_reference(family, implementation):
    base = MODELS[family](implementation=implementation)
    model = asymlora.wrap(copy.deepcopy(base), config())
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)  # B = 0: the base model
        randomize_b(model)
        got = model(x).logits.double()
        ref = float64_reference(base, model)(x).logits
    assert (got - ref).abs().max() < 2e-5 * ref.abs().max()
    assert (got - base(x).logits).abs().max() > 1e-3  # the experts' update shows


@pytest.mark.parametrize("family", sorted(MODELS))
def test_expert_a_is_the_generator_output_of_stream_plus_e(family):
    model = asymlora.wrap(MODELS[family](), config())
    layers = param_layers(model)
    assert len(layers) == 4
    # streams follow one another (modules first, then parameters) without overlap: a
    # 3-D parameter takes E streams
    spans = sorted(
        (layer.stream, getattr(layer, "experts", None) or 1) for _, layer in lora_layers(model)
    )
    assert [s for s, _ in spans] == [sum(w for _, w in spans[:i]) for i in range(len(spans))]
    assert spans[-2:] == [(spans[-2][0], 4), (spans[-2][0] + 4, 4)]
    for _, layer in layers:
        assert layer.lora_A.shape == (4, 4, layer.d_in)
        assert layer.lora_B.shape == (4, layer.d_out, 4)
        for e in range(4):
            want = asymlora.random_orthogonal(4, layer.d_in, seed=0, stream=layer.stream + e)
            assert torch.equal(layer.lora_A[e], torch.from_numpy(want))


def test_gpt_oss_blocks_are_transposed():
    model = asymlora.wrap(tiny_gpt_oss(), config(target_modules=None))
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    assert gate_up.transposed and down.transposed
    # gate_up_proj (E, H, 2I): d_in = H = 32, d_out = 2I = 48
    assert (gate_up.d_in, gate_up.d_out, down.d_in, down.d_out) == (32, 48, 24, 32)
    # the biases are parameters too, but "experts.gate_up_proj" does not select them
    assert [n for n, _ in lora_layers(model)][:2] == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_training_b_reaches_only_the_trained_factors(family):
    model = asymlora.wrap(MODELS[family](), config())
    model.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("lora_B") for n in trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trained), name
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trained), name
    for _, layer in param_layers(model):
        assert not isinstance(layer.lora_A, torch.nn.Parameter)
    # nothing of the parametrization is left in the owner or the state dict
    keys = list(model.state_dict())
    assert not any("parametrizations" in k for k in keys)
    assert "model.layers.0.mlp.experts.base_layer.gate_up_proj" in keys
    assert "model.layers.0.mlp.experts.gate_up_proj.lora_B" in keys


@pytest.mark.parametrize("train", ["A", "AB"])
def test_train_a_and_ab_start_at_the_base_and_train_their_factors(train):
    base = tiny_mixtral()
    model = asymlora.wrap(copy.deepcopy(base), config(train=train))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
    model(x, labels=x).loss.backward()
    for _, layer in param_layers(model):
        assert layer.trained_factors() == train
        # classic LoRA starts B at zero, so only B's gradient is nonzero at the start
        first = layer.lora_A if train == "A" else layer.lora_B
        assert first.grad is not None and first.grad.abs().sum() > 0
        assert layer.lora_A.grad is not None
        if train == "A":  # frozen B: orthonormal columns per expert, from stream + e
            for e in range(4):
                rows = asymlora.random_orthogonal(4, layer.d_out, seed=0, stream=layer.stream + e)
                assert torch.equal(layer.lora_B[e], torch.from_numpy(rows.T.copy()))


# --- against real PEFT ------------------------------------------------------------------


def peft_param_wrappers(peft_model) -> dict[str, object]:
    """Full parameter name -> PEFT's ParamWrapper adapting it."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            found[f"{owner}.{module.parameter_name}"] = module
    return found


def peft_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our per-expert A (E, r, d_in), B (E, d_out, r) as PEFT's lora_A (E*r, d_in) and
    interleaved lora_B (d_out, r*E): lora_B[:, k*E + e] = B_e[:, k]."""
    experts, rank, d_in = a.shape
    return a.reshape(experts * rank, d_in), b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_loss_and_b_gradients_equal_peft(family):
    peft = pytest.importorskip("peft")
    base = MODELS[family]()
    ours = asymlora.wrap(copy.deepcopy(base), config())
    randomize_b(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS
        ),
    )
    wrappers = peft_param_wrappers(theirs)
    assert set(wrappers) == {n for n, _ in param_layers(ours)}
    linears = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            if isinstance(layer, ParamLoraLayer):
                a, b = peft_layout(layer.lora_A, layer.lora_B)
                peft_layer = wrappers[name]
            else:
                a, b = layer.lora_A, layer.lora_B
                peft_layer = linears[f"base_model.model.{name}"]
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    x = ids()
    loss_ours = ours(x, labels=x).loss
    loss_theirs = theirs(x, labels=x).loss
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-5
    loss_ours.backward()
    loss_theirs.backward()
    for name, layer in param_layers(ours):
        grad = wrappers[name].lora_B["default"].weight.grad
        _, want = peft_layout(layer.lora_A, layer.lora_B.grad)
        assert (want - grad).abs().max() < 1e-5, name


# --- merging, disabling, several adapters -----------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merge_in_memory_equals_forward(family):
    model = asymlora.wrap(MODELS[family](), config())
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        weight = model.model.layers[0].mlp.experts.base_layer.gate_up_proj.detach().clone()
        asymlora.merge_adapter(model)
        assert not torch.equal(model.model.layers[0].mlp.experts.base_layer.gate_up_proj, weight)
        assert (model(x).logits - want).abs().max() < 1e-5
        asymlora.unmerge_adapter(model)
        assert (model(x).logits - want).abs().max() < 1e-5
        asymlora.unwrap(model)  # merges, and puts the plain experts module back
        assert (model(x).logits - want).abs().max() < 1e-5
    experts = model.model.layers[0].mlp.experts
    assert not isinstance(experts, ParametersWrapper)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())


def test_disable_adapters_gives_the_base_model():
    base = tiny_qwen3_moe()
    model = asymlora.wrap(copy.deepcopy(base), config())
    randomize_b(model)
    x = ids()
    with torch.no_grad(), asymlora.disable_adapters(model):
        assert torch.equal(model(x).logits, base(x).logits)


def test_second_adapter_shares_the_experts_wrapper():
    base = tiny_mixtral()
    model = asymlora.wrap(copy.deepcopy(base), config())
    randomize_b(model, seed=3)
    asymlora.wrap(model, config(seed=0), adapter_name="other")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ParametersWrapper)
    assert experts.gate_up_proj.adapter_names == ["default", "other"]
    # same seed and stream: the second adapter shares the first one's A buffer
    assert experts.gate_up_proj.adapter("other").a_shared
    x = ids()
    with torch.no_grad():
        first = model(x).logits
        asymlora.set_adapter(model, "other")
        assert torch.equal(model(x).logits, base(x).logits)  # its B is still zero
        asymlora.delete_adapter(model, "default")
        assert torch.equal(model(x).logits, base(x).logits)
        assert not torch.equal(first, base(x).logits)
    asymlora.delete_adapter(model, "other")
    assert not isinstance(model.model.layers[0].mlp.experts, ParametersWrapper)


def test_per_sample_adapters_refuses_adapted_parameters():
    model = asymlora.wrap(tiny_mixtral(), config())
    with pytest.raises(ValueError, match="per_sample_adapters cannot route batch rows"):
        with asymlora.per_sample_adapters(model, ["default", None]):
            pass


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_save_load_round_trip_bit_for_bit(family, tmp_path):
    model = asymlora.wrap(MODELS[family](), config())
    randomize_b(model)
    path = tmp_path / "experts.safetensors"
    asymlora.save_adapter(model, path)
    adapter = asymlora.read_adapter(path)
    module = adapter.config.modules["model.layers.0.mlp.experts.gate_up_proj"]
    assert (module.kind, module.experts, module.a_stored) == ("parameter", 4, False)
    assert bool(module.transposed) == (family == "gpt_oss")
    loaded = asymlora.load_adapter(MODELS[family](), path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    saved, back = dict(lora_layers(model)), dict(lora_layers(loaded))
    assert sorted(saved) == sorted(back)
    for n, l1 in saved.items():
        assert torch.equal(l1.lora_A, back[n].lora_A) and torch.equal(l1.lora_B, back[n].lora_B)
    # into the wrapped model again: the factors are replaced
    asymlora.load_adapter(loaded, path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_offline_merge_into_the_checkpoint_as_transformers_saves_it(family, tmp_path):
    """``save_pretrained`` writes Mixtral's and Qwen3-MoE's experts one linear per expert
    (the Hub's layout), gpt-oss's fused: merging the fused-parameter adapter (our file or
    its PEFT export) into that checkpoint gives the adapted model, every changed value
    the float64 reference rounded once, and unmerging gives the base back."""
    from safetensors.numpy import load_file

    from asymlora.interop.peft import export_peft

    base = MODELS[family]()
    base.save_pretrained(tmp_path / "base")
    model = asymlora.wrap(copy.deepcopy(base), config())
    randomize_b(model)
    adapter = tmp_path / "experts.safetensors"
    asymlora.save_adapter(model, adapter)
    export_peft(adapter, tmp_path / "peft")
    report = asymlora.merge_files(tmp_path / "base", adapter, tmp_path / "out")
    # gpt-oss: the PEFT directory does not record is_transposed; the base's model type does
    asymlora.merge_files(tmp_path / "base", tmp_path / "peft", tmp_path / "out-peft")
    base_t = load_file(tmp_path / "base" / "model.safetensors")
    out_t = load_file(tmp_path / "out" / "model.safetensors")
    assert out_t.keys() == base_t.keys()
    per_expert = "model.layers.0.mlp.experts.gate_up_proj" not in base_t
    assert per_expert == (family != "gpt_oss")
    # 2 layers x (q, v, gate_up, down); per expert: 4 experts x (gate, up, down) per layer
    assert report.modules == 8 and report.merged == 2 * (2 + (12 if per_expert else 2))
    peft_bytes = (tmp_path / "out-peft" / "model.safetensors").read_bytes()
    assert peft_bytes == (tmp_path / "out" / "model.safetensors").read_bytes()

    # every changed tensor against the float64 reference (from the model's own factors)
    read = asymlora.read_adapter(adapter)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        a, b = read.lora_A(name).astype(np.float64), read.lora_B(name).astype(np.float64)
        delta = read.config.scale(name) * np.matmul(b, a)  # (E, d_out, d_in)
        if not per_expert:
            delta = delta.transpose(0, 2, 1)
            want = {name: base_t[name].astype(np.float64) + delta}
        else:
            half = delta.shape[1] // 2
            moe = "block_sparse_moe" if family == "mixtral" else "mlp"
            names = (
                (("w1", "w3"), "w2")
                if family == "mixtral"
                else (("gate_proj", "up_proj"), "down_proj")
            )
            want = {}
            for e in range(delta.shape[0]):
                prefix = f"model.layers.1.{moe}.experts.{e}"
                if name.endswith("gate_up_proj"):
                    for p, rows in zip(names[0], (slice(0, half), slice(half, None))):
                        key = f"{prefix}.{p}.weight"
                        want[key] = base_t[key].astype(np.float64) + delta[e, rows]
                else:
                    key = f"{prefix}.{names[1]}.weight"
                    want[key] = base_t[key].astype(np.float64) + delta[e]
        for key, exact in want.items():
            np.testing.assert_array_equal(out_t[key], round_once(exact, np.float32), err_msg=key)

    merged = type(base).from_pretrained(tmp_path / "out").eval()
    merged.set_experts_implementation("grouped_mm")
    x = ids()
    with torch.no_grad():
        assert (merged(x).logits - model(x).logits).abs().max() < 1e-5
    asymlora.unmerge_files(tmp_path / "out", adapter, tmp_path / "back")
    back_t = load_file(tmp_path / "back" / "model.safetensors")
    for key, w in base_t.items():
        np.testing.assert_allclose(back_t[key], w, rtol=0, atol=1e-6, err_msg=key)


def test_save_load_round_trip_of_a_trained_a(tmp_path):
    model = asymlora.wrap(tiny_qwen3_moe(), config(train="AB"))
    randomize_b(model)
    with torch.no_grad():
        for _, layer in param_layers(model):
            layer.lora_A.add_(0.01)
    path = tmp_path / "ab.safetensors"
    asymlora.save_adapter(model, path)
    loaded = asymlora.load_adapter(tiny_qwen3_moe(), path, is_trainable=True)
    for _, layer in param_layers(loaded):
        assert layer.trained_factors() == "AB"
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# --- selection and errors ------------------------------------------------------------------


def test_only_parameters_and_full_names():
    model = asymlora.wrap(
        tiny_mixtral(),
        config(target_modules=None, target_parameters=["model.layers.1.mlp.experts.down_proj"]),
    )
    assert [n for n, _ in lora_layers(model)] == ["model.layers.1.mlp.experts.down_proj"]


def test_all_linear_warns_once_about_fused_experts():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asymlora.wrap(tiny_mixtral(), config(target_modules="all-linear", target_parameters=()))
    messages = [str(w.message) for w in caught if "all-linear" in str(w.message)]
    assert len(messages) == 1
    assert "experts.gate_up_proj" in messages[0] and "target_parameters" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # covered: no warning
        asymlora.wrap(tiny_mixtral(), config(target_modules="all-linear"))


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vector = torch.nn.Parameter(torch.randn(8))
        self.kernel = torch.nn.Parameter(torch.randn(2, 3, 4, 5))
        self.matrix = torch.nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        return x @ self.matrix.t() + self.vector[:6]


class _Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["nothing_here"], "target_parameters entry 'nothing_here' matches no parameter"),
        (["inner.vector"], r"inner.vector: a 1-D parameter \(8,\)"),
        (["inner.kernel"], r"inner.kernel: a 4-D parameter \(2, 3, 4, 5\)"),
    ],
)
def test_bad_entries_raise_one_line_and_leave_the_model(entries, message):
    model = _Odd()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as info:
        asymlora.wrap(
            model, asymlora.LoraConfig(r=2, target_modules=None, target_parameters=entries)
        )
    assert "\n" not in str(info.value)
    assert not asymlora.nn.is_wrapped(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_a_2d_parameter_of_any_module():
    model = _Odd()
    x = torch.randn(3, 8)
    asymlora.wrap(
        model, asymlora.LoraConfig(r=2, target_modules=None, target_parameters=["matrix"])
    )
    layer = model.inner.matrix
    assert isinstance(layer, ParamLoraLayer) and layer.lora_B.shape == (6, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
        delta = layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        owner = model.inner.base_layer
        ref = x.double() @ (owner.matrix.double() + delta).t() + owner.vector[:6].double()
    assert (model(x).double() - ref).abs().max() < 1e-5


def test_dropout_is_refused_with_target_parameters():
    with pytest.raises(ValueError, match="dropout"):
        config(dropout=0.1)
