"""Adapter files, offline merge and PEFT directories for the kinds beyond linear layers:
embeddings, convolutions (1-D, 2-D, 3-D) and parameters (2-D, and 3-D MoE experts).

Base tensors come from real torch modules (``nn.Embedding``, ``nn.Conv1d/2d/3d``) and a
tiny transformers Mixtral built from a config; PEFT adapters are made and saved by real
PEFT. Every merged value must equal the float64 reference computed here, per kind, from
the factors (the weight viewed as the kind's matrix), rounded once.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _reference import round_once

import asymlora
from asymlora import AdapterConfig, ModuleConfig
from asymlora._safetensors import SafetensorsFile
from asymlora.errors import AdapterFormatError, AsymloraError
from asymlora.interop.peft import export_peft, import_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
SEED = 77


# --------------------------------------------------------------------------- helpers


def _mixtral(experts: int = 3) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=experts,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


class Layers(torch.nn.Module):
    """One module of every non-linear kind (and a linear), as a model would hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 24)
        self.c1 = torch.nn.Conv1d(4, 8, 5)
        self.c2 = torch.nn.Conv2d(6, 10, (3, 2))
        self.c3 = torch.nn.Conv3d(2, 4, (2, 2, 3))
        self.lin = torch.nn.Linear(24, 12)

    def forward(self, ids, x1, x2, x3):
        return (
            self.lin(self.emb(ids)).sum()
            + self.c1(x1).sum()
            + self.c2(x2).sum()
            + self.c3(x3).sum()
        )


def _layers() -> Layers:
    torch.manual_seed(1)
    return Layers().eval()


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (
        torch.randint(0, 50, (2, 7), generator=g),
        torch.randn(2, 4, 11, generator=g),
        torch.randn(2, 6, 7, 6, generator=g),
        torch.randn(1, 2, 4, 5, 6, generator=g),
    )


def _save_base(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return path


def _read(path: Path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path)
    return st.read({n: n for n in st.names})


def _delta(adapter: asymlora.Adapter, name: str, weight_shape: tuple[int, ...]) -> np.ndarray:
    """The update of the base tensor of ``name``, in float64, in the base's layout: the
    reference for every kind, written from the kind table of the format spec."""
    m = adapter.config.modules[name]
    a = adapter.lora_A(name).astype(np.float64)
    b = adapter.lora_B(name).astype(np.float64)
    s = adapter.config.scale(name)
    if m.experts is not None:
        blocks = np.stack([s * (b[e] @ a[e]) for e in range(m.experts)])
        return blocks.transpose(0, 2, 1) if m.transposed else blocks
    d = s * (b @ a)
    if m.kind == "embedding" or (m.kind == "parameter" and m.transposed):
        return d.T
    return d.reshape(weight_shape)


def _reference(base: dict[str, np.ndarray], adapter_path: Path, sign: float = 1.0):
    adapter = asymlora.read_adapter(adapter_path)
    out = dict(base)
    for name, m in adapter.config.modules.items():
        target = name if m.kind == "parameter" else f"{name}.weight"
        w = base[target]
        out[target] = round_once(
            w.astype(np.float64) + sign * _delta(adapter, name, w.shape), w.dtype
        )
    return out


def _assert_bits_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def _rand(shape, seed: int, scale: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _write(path: Path, modules: dict[str, ModuleConfig], rank: int = 3, alpha: float = 5.0):
    """An adapter with random B (and random stored A where ``a_stored``)."""
    tensors = {}
    for i, (name, m) in enumerate(modules.items()):
        r = rank if m.rank is None else m.rank
        tensors[f"{name}.lora_B"] = _rand(m.b_shape(r), 100 + i)
        if m.a_stored:
            tensors[f"{name}.lora_A"] = _rand(m.a_shape(r), 200 + i)
    config = AdapterConfig(rank=rank, alpha=alpha, seed=SEED, modules=modules)
    asymlora.write_adapter(path, config, tensors)
    return path


def _kind_modules(model: Layers, mix: torch.nn.Module) -> tuple[dict, dict[str, ModuleConfig]]:
    """Base tensors and one module of every kind on them."""
    experts = mix.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, H), (E, H, I)
    e, two_i, h = gate_up.shape
    tensors = {k: v for k, v in model.state_dict().items()}
    tensors["moe.experts.gate_up_proj"] = gate_up
    tensors["moe.experts.down_proj"] = down
    # gpt-oss stores each expert transposed, (E, d_in, d_out)
    tensors["oss.experts.down_proj"] = down.transpose(1, 2)
    tensors["router.weight"] = mix.model.layers[0].mlp.gate.weight  # a 2-D parameter
    modules = {
        "emb": ModuleConfig(d_in=50, d_out=24, stream=0, kind="embedding"),
        "c1": ModuleConfig(d_in=4 * 5, d_out=8, stream=1, kind="conv", kernel=(5,)),
        "c2": ModuleConfig(d_in=6 * 3 * 2, d_out=10, stream=2, kind="conv", kernel=(3, 2)),
        "c3": ModuleConfig(
            d_in=2 * 12, d_out=4, stream=3, kind="conv", kernel=(2, 2, 3), a_stored=True
        ),
        "lin": ModuleConfig(d_in=24, d_out=12, stream=4, rank=2),
        "moe.experts.gate_up_proj": ModuleConfig(
            d_in=h, d_out=two_i, stream=10, kind="parameter", experts=e
        ),
        "moe.experts.down_proj": ModuleConfig(
            d_in=two_i // 2, d_out=h, stream=20, kind="parameter", experts=e, a_stored=True
        ),
        "oss.experts.down_proj": ModuleConfig(
            d_in=two_i // 2, d_out=h, stream=30, kind="parameter", experts=e, transposed=True
        ),
        "router.weight": ModuleConfig(d_in=h, d_out=e, stream=40, kind="parameter"),
    }
    return tensors, modules


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    tensors, modules = _kind_modules(_layers(), _mixtral())
    adapter = _write(tmp / "kinds.safetensors", modules)
    return tmp, tensors, adapter


# --------------------------------------------------------------------------- format


def test_linear_modules_are_written_without_kind_fields(tmp_path):
    m = ModuleConfig(d_in=8, d_out=4, stream=0)
    assert m.to_dict() == {"d_in": 8, "d_out": 4, "stream": 0, "a_stored": False}
    path = _write(tmp_path / "a.safetensors", {"x": m})
    with open(path, "rb") as f:
        header = f.read(2000)
    assert b'"kind"' not in header and b'"experts"' not in header


def test_kinds_round_trip_and_inspect(kinds):
    _, _, path = kinds
    adapter = asymlora.read_adapter(path)
    cfg = adapter.config
    assert cfg.modules["c2"].kernel == (3, 2) and cfg.modules["c2"].kind == "conv"
    assert cfg.modules["oss.experts.down_proj"].transposed is True
    assert cfg.modules["lin"].kind == "linear"
    report = adapter.inspect()
    assert "conv [3, 2]" in report and "parameter 3 experts transposed" in report
    assert "embedding" in report


def test_expert_a_is_regenerated_per_expert_stream(kinds):
    _, _, path = kinds
    adapter = asymlora.read_adapter(path)
    name = "moe.experts.gate_up_proj"
    m = adapter.config.modules[name]
    a = adapter.lora_A(name)
    assert a.shape == (3, 3, m.d_in)
    for e in range(3):
        want = asymlora.random_orthogonal(3, m.d_in, seed=SEED, stream=m.stream + e)
        assert a[e].tobytes() == np.asarray(want).tobytes()
    assert adapter.lora_B(name).shape == (3, m.d_out, 3)
    assert adapter.delta(name).shape == (3, m.d_out, m.d_in)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (ModuleConfig(d_in=8, d_out=4, stream=0, kernel=(2,)), "kernel: is only for kind"),
        (ModuleConfig(d_in=8, d_out=4, stream=0, kind="conv"), "kernel: missing"),
        (ModuleConfig(d_in=8, d_out=4, stream=0, kind="conv", kernel=(3,)), "does not divide"),
        (
            ModuleConfig(d_in=8, d_out=4, stream=0, kind="conv", kernel=(1, 1, 1, 2)),
            "1 to 3 integers",
        ),
        (ModuleConfig(d_in=8, d_out=4, stream=0, kind="embedding", experts=2), "experts: is only"),
        (ModuleConfig(d_in=8, d_out=4, stream=0, transposed=True), "transposed: is only"),
        (ModuleConfig(d_in=8, d_out=4, stream=0, kind="parameter", experts=0), "experts: must be"),
        (
            ModuleConfig(d_in=1 << 20, d_out=4, stream=0, kind="parameter", experts=512),
            "512 experts x rank 3",
        ),
        (
            ModuleConfig(d_in=8, d_out=4, stream=2**64 - 2, kind="parameter", experts=3),
            r"passes 2\^64",
        ),
    ],
)
def test_kind_fields_are_validated(tmp_path, module, match):
    config = AdapterConfig(rank=3, alpha=1.0, seed=0, modules={"m": module})
    with pytest.raises(AdapterFormatError, match=match) as info:
        asymlora.write_adapter(tmp_path / "a.safetensors", config, {})
    assert "'m'" in str(info.value) or '"m"' in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "a.safetensors").exists()


def test_expert_streams_must_not_overlap(tmp_path):
    modules = {
        "a.w": ModuleConfig(d_in=8, d_out=4, stream=0, kind="parameter", experts=4),
        "b": ModuleConfig(d_in=8, d_out=4, stream=3),
    }
    config = AdapterConfig(rank=2, alpha=1.0, seed=0, modules=modules)
    with pytest.raises(
        AdapterFormatError, match=r'module "b": stream: stream 3 overlaps streams 0..4'
    ):
        asymlora.write_adapter(tmp_path / "a.safetensors", config, {})


def test_expert_factor_shapes_are_checked(tmp_path):
    m = ModuleConfig(d_in=8, d_out=4, stream=0, kind="parameter", experts=2)
    config = AdapterConfig(rank=2, alpha=1.0, seed=0, modules={"w": m})
    with pytest.raises(AdapterFormatError, match=r"expected \[2, 4, 2\]"):
        asymlora.write_adapter(
            tmp_path / "a.safetensors", config, {"w.lora_B": np.zeros((4, 2), np.float32)}
        )


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_every_kind_equals_the_float64_reference(kinds, dtype):
    tmp, tensors, adapter = kinds
    tag = str(dtype).split(".")[-1]
    base_path = _save_base(tensors, tmp / f"base-{tag}.safetensors", dtype)
    base = _read(base_path)
    want = _reference(base, adapter)
    outs = []
    for threads in (1, 2):
        out = tmp / f"merged-{tag}-{threads}.safetensors"
        report = asymlora.merge_files(base_path, adapter, out, threads=threads, force=True)
        assert report.merged == 9
        outs.append(out.read_bytes())
        _assert_bits_equal(_read(out), want)
    assert outs[0] == outs[1]
    # unmerge of the merged checkpoint: the reference of merged - delta, rounded once
    back = tmp / f"back-{tag}.safetensors"
    asymlora.unmerge_files(tmp / f"merged-{tag}-1.safetensors", adapter, back, force=True)
    merged = _read(tmp / f"merged-{tag}-1.safetensors")
    _assert_bits_equal(_read(back), _reference(merged, adapter, sign=-1.0))


def test_merge_names_the_module_and_the_expected_shape(kinds, tmp_path):
    _, tensors, adapter = kinds
    wrong = dict(tensors)
    wrong["moe.experts.down_proj"] = tensors["moe.experts.down_proj"].transpose(1, 2)
    wrong["c2.weight"] = tensors["c2.weight"].reshape(10, 6, 2, 3)
    base = _save_base(wrong, tmp_path / "base.safetensors", torch.float32)
    with pytest.raises(AsymloraError) as info:
        asymlora.merge_files(base, adapter, tmp_path / "out.safetensors")
    message = str(info.value)
    assert "module c2 is a conv 10 x 36" in message and "[10, 6, 3, 2]" in message
    assert "module moe.experts.down_proj is a parameter 32 x 16" in message
    assert "[3, 32, 16], but it has shape [3, 16, 32]" in message
    assert "transposed = true" in message  # the gpt-oss hint
    assert "2 problem(s)" in message
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- PEFT


def _no_key_warnings(caplog, run):
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        result = run()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]
    assert not bad, bad
    return result


def _randomize_b(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


PEFT_CASES = {
    "layers": dict(
        make=_layers,
        lora=dict(r=2, lora_alpha=5, target_modules=["emb", "c1", "c2", "c3", "lin"]),
    ),
    "mixtral": dict(
        make=_mixtral,
        lora=dict(
            r=2,
            lora_alpha=3,
            target_modules=["embed_tokens", "q_proj"],
            target_parameters=["gate_up_proj", "down_proj"],
            rank_pattern={"down_proj": 3},
        ),
    ),
}


def _run(model: torch.nn.Module, case: str) -> torch.Tensor:
    with torch.no_grad():
        if case == "layers":
            return model(*_inputs())
        ids = torch.arange(12).reshape(2, 6) % 64
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_round_trip_and_offline_merge(case, tmp_path, caplog):
    spec = PEFT_CASES[case]
    make = spec["make"]
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**spec["lora"]))
    _randomize_b(peft_model)
    peft_model.eval()
    expected = _run(peft_model, case)
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(str(peft_dir), save_embedding_layers=False)

    ours = tmp_path / "ours.safetensors"
    import_peft(peft_dir, ours, seed=5)
    kinds = {n: m.kind for n, m in asymlora.read_adapter(ours).config.modules.items()}
    assert set(kinds.values()) >= ({"embedding"} if case == "mixtral" else {"embedding", "conv"})
    back = tmp_path / "back"
    export_peft(ours, back, model=make() if case == "mixtral" else None)
    loaded = _no_key_warnings(
        caplog, lambda: peft.PeftModel.from_pretrained(make(), str(back)).eval()
    )
    torch.testing.assert_close(_run(loaded, case), expected, atol=1e-5, rtol=1e-5)
    saved = peft.utils.get_peft_model_state_dict(loaded, save_embedding_layers=False)
    original = peft.utils.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert set(saved) == set(original)
    for key in original:
        assert torch.equal(saved[key], original[key]), key

    # offline merge of the PEFT directory == PEFT's merge_and_unload, == the reference
    base_sd = make().state_dict()
    base_path = _save_base(base_sd, tmp_path / "base.safetensors", torch.float32)
    out = tmp_path / "merged.safetensors"
    asymlora.merge_files(base_path, peft_dir, out, threads=2)
    got = _read(out)
    _assert_bits_equal(got, _reference(_read(base_path), ours))
    merged = peft_model.merge_and_unload().state_dict()
    for key, value in got.items():
        torch.testing.assert_close(
            torch.from_numpy(value), merged[key].float(), atol=1e-6, rtol=1e-6, msg=key
        )


def test_peft_nested_wrappers_map_to_their_parameters(tmp_path):
    model = peft.get_peft_model(
        _mixtral(), peft.LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"])
    )
    model.save_pretrained(str(tmp_path / "peft"))
    with open(tmp_path / "peft" / "adapter_model.safetensors", "rb") as f:
        header = f.read(4000)
    assert b"experts.base_layer.lora_A.weight" in header
    import_peft(tmp_path / "peft", tmp_path / "a.safetensors")
    cfg = asymlora.read_adapter(tmp_path / "a.safetensors").config
    gate_up = cfg.modules["model.layers.0.mlp.experts.gate_up_proj"]
    down = cfg.modules["model.layers.0.mlp.experts.down_proj"]
    assert (gate_up.d_out, gate_up.d_in, gate_up.experts) == (32, 32, 3)
    assert (down.d_out, down.d_in, down.experts) == (32, 16, 3)
    # PEFT saves target_parameters in no fixed order: the reader does not depend on it
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["down_proj", "gate_up_proj"]


def test_saved_embedding_copy_is_ignored_with_a_warning(tmp_path):
    model = peft.get_peft_model(_mixtral(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    model.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=True)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        import_peft(tmp_path / "peft", tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    "config, head, warned",
    [
        ({"tie_word_embeddings": True}, False, True),
        ({}, False, True),  # transformers' default: tied
        ({}, True, False),  # the head is stored: not tied
        ({"tie_word_embeddings": False}, False, False),
    ],
)
def test_merging_an_embedding_the_head_is_tied_to_warns(tmp_path, config, head, warned):
    base = tmp_path / "base"
    base.mkdir()
    tensors = {"model.embed.weight": torch.randn(50, 24)}
    if head:
        tensors["lm_head.weight"] = torch.randn(50, 24)
    _save_base(tensors, base / "model.safetensors", torch.float32)
    (base / "config.json").write_text(json.dumps(config))
    module = ModuleConfig(d_in=50, d_out=24, stream=0, kind="embedding")
    adapter = _write(tmp_path / "emb.safetensors", {"model.embed": module})
    report = asymlora.merge_files(base, adapter, tmp_path / "out")
    tied = [w for w in report.warnings if "ties the output head to it" in w]
    assert len(tied) == int(warned), report.warnings
    if warned:
        assert "module model.embed is an embedding" in tied[0] and "config.json" in tied[0]
