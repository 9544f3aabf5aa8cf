"""PEFT interop: ``export_peft`` directories load in real PEFT and compute what the
asymlora-wrapped model computes; ``import_peft`` files load with ``asymlora.load_adapter``
and compute what the PEFT model computes; export -> import keeps every bit; unsupported
PEFT directories are refused with a message naming the problem, writing nothing.

Tiny transformers models are built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import asymlora  # noqa: E402
from asymlora import AdapterConfig, ModuleConfig  # noqa: E402
from asymlora.interop.peft import export_peft, import_peft  # noqa: E402
from asymlora.nn.tensors import to_numpy  # noqa: E402

VOCAB = 100
ATOL, RTOL = 1e-5, 1e-4


# --------------------------------------------------------------------------- models


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB)
    return transformers.GPT2LMHeadModel(cfg)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"llama": _llama, "bert": _bert, "gpt2": _gpt2}


class Base:
    """A tiny model's base weights, kept so that fresh copies of the same base can be made."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        self.kind = kind
        torch.manual_seed(seed)
        self.state = {k: v.clone() for k, v in MODELS[kind]().state_dict().items()}

    def fresh(self) -> torch.nn.Module:
        model = MODELS[self.kind]()
        model.load_state_dict(self.state)
        return model.eval()


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    if kind == "bert":
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


def _logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_inputs(kind)).logits.float()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=ATOL, rtol=RTOL), f"max |diff| = {diff:.3g}"


def _randomize_b(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in asymlora.nn.lora_layers(model):
            b = layer.lora_B
            b.copy_(torch.randn(b.shape, generator=g).to(b.dtype) * 0.2)


@contextmanager
def _no_key_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails if PEFT warns (``warnings`` or logging) about missing/unexpected keys or
    about a wrong ``fan_in_fan_out``."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [
        m
        for m in messages
        if any(word in m.lower() for word in ("missing", "unexpected", "fan_in_fan_out"))
    ]
    assert not bad, bad


def _load_peft(base: Base, peft_dir: Path, caplog: pytest.LogCaptureFixture) -> torch.nn.Module:
    with _no_key_warnings(caplog):
        model = peft.PeftModel.from_pretrained(base.fresh(), str(peft_dir))
    # Every tensor of the directory is one PEFT loaded, and PEFT has no other adapter
    # tensor: what PEFT would save for the loaded model equals the file.
    saved = peft.utils.get_peft_model_state_dict(model)
    on_disk = safetensors_torch.load_file(str(peft_dir / "adapter_model.safetensors"))
    assert set(saved) == set(on_disk)
    for key, value in on_disk.items():
        assert torch.equal(saved[key].to(value.dtype), value), key
    return model.eval()


# --------------------------------------------------------------------------- export

EXPORT_CASES = {
    "llama": dict(kind="llama", lora=dict(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])),
    "llama-patterns": dict(
        kind="llama",
        lora=dict(
            r=4,
            alpha=8.0,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"v_proj": 3.0, "down_proj": 5.5},
        ),
    ),
    "llama-rslora": dict(
        kind="llama",
        lora=dict(
            r=8,
            alpha=4.0,
            rslora=True,
            target_modules=["o_proj", "up_proj"],
            rank_pattern={"up_proj": 2},
            alpha_pattern={"o_proj": 7.0},
        ),
    ),
    "bert-modules-to-save": dict(
        kind="bert",
        lora=dict(
            r=4, alpha=16.0, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    ),
    "gpt2-conv1d": dict(
        kind="gpt2", lora=dict(r=4, alpha=8.0, target_modules=["c_attn", "c_proj"])
    ),
}


def _train_two_steps(model: torch.nn.Module, kind: str) -> None:
    """Two AdamW steps (B and the classifier move; A stays the seeded one)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(2):
        out = model(**_inputs(kind), labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _wrapped_adapter(case: dict, tmp_path: Path) -> tuple[Base, torch.nn.Module, Path]:
    base = Base(case["kind"])
    model = asymlora.wrap(base.fresh(), asymlora.LoraConfig(train="B", seed=11, **case["lora"]))
    if case["kind"] == "bert":
        _train_two_steps(model, "bert")
    else:
        _randomize_b(model, seed=3)
    path = tmp_path / "adapter.safetensors"
    asymlora.save_adapter(model, path)
    return base, model, path


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_loads_in_peft_with_equal_outputs(name, tmp_path, caplog):
    case = EXPORT_CASES[name]
    kind = case["kind"]
    base, model, adapter_path = _wrapped_adapter(case, tmp_path)
    ours = _logits(model, kind)
    # The adapter matters: the test could not pass with an adapter that is not applied.
    assert (ours - _logits(base.fresh(), kind)).abs().max() > 1e-2

    out = export_peft(adapter_path, tmp_path / "peft")
    assert out == tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter = asymlora.read_adapter(adapter_path)
    cfg = adapter.config
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"
    assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (cfg.rank, cfg.alpha)
    assert set(peft_cfg["target_modules"]) == set(cfg.modules)
    assert peft_cfg["use_rslora"] == (cfg.scaling == "alpha/sqrt(r)")
    assert peft_cfg["fan_in_fan_out"] == (kind == "gpt2")
    assert peft_cfg["modules_to_save"] == (["classifier"] if kind == "bert" else None)
    assert (peft_cfg["bias"], peft_cfg["lora_dropout"], peft_cfg["task_type"]) == (
        "none",
        0.0,
        None,
    )
    assert peft_cfg["auto_mapping"]["base_model_class"] == type(model).__name__

    keys = safetensors_torch.load_file(str(out / "adapter_model.safetensors"))
    for module in cfg.modules:
        a = keys.pop(f"base_model.model.{module}.lora_A.weight")
        b = keys.pop(f"base_model.model.{module}.lora_B.weight")
        assert np.array_equal(a.numpy(), adapter.lora_A(module))  # A materialised from the seed
        assert np.array_equal(b.numpy(), adapter.lora_B(module))
    expected_full = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(keys) == (expected_full if kind == "bert" else set())

    peft_model = _load_peft(base, out, caplog)
    _assert_close(_logits(peft_model, kind), ours)
    # PEFT's own reading of the config gives every module our rank and scale.
    for name_, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module_name = name_.removeprefix("base_model.model.")
            assert module.r["default"] == cfg.module_rank(module_name)
            assert module.scaling["default"] == cfg.scale(module_name)


def test_export_patterns_give_peft_the_per_module_values(tmp_path):
    case = EXPORT_CASES["llama-patterns"]
    _, _, adapter_path = _wrapped_adapter(case, tmp_path)
    peft_cfg = json.loads(
        (export_peft(adapter_path, tmp_path / "p") / "adapter_config.json").read_text()
    )
    assert peft_cfg["rank_pattern"] == {
        "model.layers.0.mlp.down_proj": 2,
        "model.layers.1.mlp.down_proj": 2,
        "model.layers.1.self_attn.q_proj": 6,
    }
    assert peft_cfg["alpha_pattern"] == {
        "model.layers.0.mlp.down_proj": 5.5,
        "model.layers.1.mlp.down_proj": 5.5,
        "model.layers.0.self_attn.v_proj": 3,
        "model.layers.1.self_attn.v_proj": 3,
    }


def test_export_name_or_path_and_auto_peft_model(tmp_path, caplog):
    """``base_model_name_or_path`` plus ``auto_mapping`` let ``AutoPeftModel`` rebuild the
    whole model from the exported directory alone."""
    base, model, adapter_path = _wrapped_adapter(EXPORT_CASES["llama"], tmp_path)
    base_dir = tmp_path / "base"
    base.fresh().save_pretrained(base_dir)
    out = export_peft(adapter_path, tmp_path / "peft", base_model_name_or_path=str(base_dir))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )
    with _no_key_warnings(caplog):
        auto = peft.AutoPeftModel.from_pretrained(str(out))
    _assert_close(_logits(auto, "llama"), _logits(model, "llama"))


def test_export_takes_name_or_path_from_the_adapter(tmp_path):
    cfg = AdapterConfig(
        rank=2,
        alpha=2.0,
        seed=1,
        modules={"lin": ModuleConfig(d_in=4, d_out=3, stream=0)},
        base_model={"name_or_path": "org/model"},
    )
    asymlora.write_adapter(tmp_path / "a.safetensors", cfg, {"lin.lora_B": np.ones((3, 2), "f4")})
    out = export_peft(tmp_path / "a.safetensors", tmp_path / "p")
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == "org/model"
    assert peft_cfg["auto_mapping"] is None  # no class recorded
    out2 = export_peft(tmp_path / "a.safetensors", tmp_path / "p2", base_model_name_or_path="x/y")
    assert (
        json.loads((out2 / "adapter_config.json").read_text())["base_model_name_or_path"] == "x/y"
    )


# --------------------------------------------------------------------------- import

IMPORT_CASES = {
    "llama-patterns": dict(
        kind="llama",
        lora=dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2, r"^model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"v_proj": 3, "layers.1.mlp.down_proj": 0.5},
        ),
    ),
    "llama-rslora": dict(
        kind="llama",
        lora=dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj"]),
    ),
    "bert-modules-to-save": dict(
        kind="bert",
        lora=dict(
            r=4, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    ),
    "gpt2-fan-in-fan-out": dict(
        kind="gpt2",
        lora=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
}


def _peft_dir(
    base: Base, tmp_path: Path, name: str = "peft", adapter_name: str = "default", **lora
) -> tuple[torch.nn.Module, Path]:
    """A PEFT LoRA with random non-zero factors (and a perturbed modules_to_save copy)."""
    torch.manual_seed(5)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    model = peft.get_peft_model(base.fresh(), config, adapter_name=adapter_name)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / name
    model.save_pretrained(str(out))
    return model.eval(), out


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_loads_in_asymlora_with_equal_outputs(name, tmp_path):
    case = IMPORT_CASES[name]
    kind = case["kind"]
    base = Base(kind, seed=1)
    peft_model, peft_dir = _peft_dir(base, tmp_path, **case["lora"])
    expected = _logits(peft_model, kind)
    assert (expected - _logits(base.fresh(), kind)).abs().max() > 1e-2

    path = import_peft(peft_dir, tmp_path / "imported.safetensors", seed=9)
    assert path == tmp_path / "imported.safetensors"
    adapter = asymlora.read_adapter(path)
    cfg = adapter.config
    assert cfg.seed == 9
    assert all(m.a_stored for m in cfg.modules.values())
    assert cfg.scaling == ("alpha/sqrt(r)" if case["lora"].get("use_rslora") else "alpha/r")
    assert cfg.base_model["fan_in_fan_out"] == (kind == "gpt2")
    assert cfg.base_model["class"] == type(base.fresh()).__name__
    assert set(cfg.full_tensors) == (
        {"classifier.weight", "classifier.bias"} if kind == "bert" else set()
    )

    # Rank and scale of every module as PEFT set them up.
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(peft_layers) == set(cfg.modules)
    for module, layer in peft_layers.items():
        assert cfg.module_rank(module) == layer.r["default"]
        assert cfg.scale(module) == layer.scaling["default"]
        assert np.array_equal(adapter.lora_A(module), to_numpy(layer.lora_A["default"].weight))
        assert np.array_equal(adapter.lora_B(module), to_numpy(layer.lora_B["default"].weight))

    ours = asymlora.load_adapter(base.fresh(), path)
    _assert_close(_logits(ours, kind), expected)


def test_import_rank_and_alpha_patterns(tmp_path):
    case = IMPORT_CASES["llama-patterns"]
    _, peft_dir = _peft_dir(Base("llama"), tmp_path, **case["lora"])
    cfg = asymlora.read_adapter(import_peft(peft_dir, tmp_path / "a.safetensors")).config
    assert (cfg.rank, cfg.alpha) == (4, 8.0)
    for layer in (0, 1):
        assert cfg.module_rank(f"model.layers.{layer}.mlp.down_proj") == 2
        assert cfg.modules[f"model.layers.{layer}.self_attn.v_proj"].alpha == 3.0
        assert cfg.modules[f"model.layers.{layer}.self_attn.v_proj"].rank is None
    assert cfg.module_rank("model.layers.0.self_attn.q_proj") == 4
    assert cfg.module_rank("model.layers.1.self_attn.q_proj") == 6
    assert cfg.modules["model.layers.0.mlp.down_proj"].alpha is None
    assert cfg.modules["model.layers.1.mlp.down_proj"].alpha == 0.5
    assert cfg.scale("model.layers.1.mlp.down_proj") == 0.5 / 2


def test_import_bf16_keeps_peft_bits(tmp_path):
    base = Base("llama")
    torch.manual_seed(5)
    model = peft.get_peft_model(
        base.fresh().to(torch.bfloat16),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
        autocast_adapter_dtype=False,
    )
    model.save_pretrained(str(tmp_path / "peft"))
    on_disk = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {v.dtype for v in on_disk.values()} == {torch.bfloat16}
    adapter = asymlora.read_adapter(import_peft(tmp_path / "peft", tmp_path / "a.safetensors"))
    for module in adapter.config.modules:
        for factor, ours in (("A", adapter.lora_A(module)), ("B", adapter.lora_B(module))):
            theirs = on_disk[f"base_model.model.{module}.lora_{factor}.weight"]
            assert ours.dtype == np.dtype(ml_dtypes.bfloat16)
            assert np.array_equal(
                ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16)
            )


def test_import_non_default_adapter_name(tmp_path):
    """PEFT saves a non-default adapter in a subdirectory with plain key names."""
    base = Base("llama")
    peft_model, peft_dir = _peft_dir(
        base, tmp_path, adapter_name="mine", r=2, lora_alpha=4, target_modules=["q_proj"]
    )
    with pytest.raises(ValueError, match=r'subdirectories \["mine"\]'):
        import_peft(peft_dir, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    path = import_peft(peft_dir / "mine", tmp_path / "a.safetensors")
    ours = asymlora.load_adapter(base.fresh(), path)
    _assert_close(_logits(ours, "llama"), _logits(peft_model, "llama"))


# --------------------------------------------------------------------------- round trip


def _files_equal(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_round_trip_from_a_wrapped_model_is_bit_exact(tmp_path):
    _, _, adapter_path = _wrapped_adapter(EXPORT_CASES["bert-modules-to-save"], tmp_path)
    first = export_peft(adapter_path, tmp_path / "peft1")
    back = import_peft(first, tmp_path / "back.safetensors")
    original, imported = asymlora.read_adapter(adapter_path), asymlora.read_adapter(back)
    _assert_same_adapter(original, imported)
    # Exporting the imported adapter gives the same directory, byte for byte.
    second = export_peft(back, tmp_path / "peft2")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert _files_equal(first / name, second / name), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_written_adapter_is_bit_exact(tmp_path, dtype):
    """Per-module rank/alpha, rsLoRA, a stored A, a gain on A, a full tensor, all in
    ``dtype`` (bf16 as ``ml_dtypes.bfloat16``)."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    rng = np.random.default_rng(0)
    modules = {
        "enc.layers.0.q": ModuleConfig(d_in=16, d_out=16, stream=0),
        "enc.layers.0.v": ModuleConfig(d_in=16, d_out=12, stream=1, rank=2, alpha=3.5),
        "enc.layers.1.up": ModuleConfig(d_in=16, d_out=40, stream=2, a_stored=True, rank=6),
        "enc.layers.10.q": ModuleConfig(d_in=16, d_out=16, stream=3, alpha=1.0),
    }
    cfg = AdapterConfig(
        rank=4,
        alpha=8.0,
        seed=2**63 + 5,
        modules=modules,
        scaling="alpha/sqrt(r)",
        a_dtype=dtype,
        a_gain=0.75,
        full_tensors=("head.weight",),
        base_model={"name_or_path": "tiny", "fan_in_fan_out": False},
    )
    tensors = {}
    for name, m in modules.items():
        r = cfg.module_rank(name)
        tensors[f"{name}.lora_B"] = rng.standard_normal((m.d_out, r)).astype(np_dtype)
        if m.a_stored:
            tensors[f"{name}.lora_A"] = rng.standard_normal((r, m.d_in)).astype(np_dtype)
    tensors["head.weight"] = rng.standard_normal((3, 16)).astype(np_dtype)
    asymlora.write_adapter(tmp_path / "a.safetensors", cfg, tensors)

    out = export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    on_disk = safetensors_torch.load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in on_disk.values()} == {getattr(torch, dtype)}
    assert set(on_disk) == {
        *(f"base_model.model.{n}.lora_{f}.weight" for n in modules for f in "AB"),
        "base_model.model.head.weight",
    }
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["use_rslora"] is True
    assert peft_cfg["modules_to_save"] == ["head"]
    assert peft_cfg["target_modules"][-1] == "enc.layers.10.q"  # natural order
    back = import_peft(out, tmp_path / "back.safetensors")
    _assert_same_adapter(
        asymlora.read_adapter(tmp_path / "a.safetensors"), asymlora.read_adapter(back)
    )


def _assert_same_adapter(original: asymlora.Adapter, imported: asymlora.Adapter) -> None:
    a, b = original.config, imported.config
    assert set(a.modules) == set(b.modules)
    assert a.scaling == b.scaling
    for module, m in a.modules.items():
        assert b.modules[module].a_stored
        assert (b.modules[module].d_in, b.modules[module].d_out) == (m.d_in, m.d_out)
        assert b.module_rank(module) == a.module_rank(module)
        assert b.scale(module) == a.scale(module)
        for get in (asymlora.Adapter.lora_A, asymlora.Adapter.lora_B):
            x, y = get(original, module), get(imported, module)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), (module, get.__name__)
    assert set(a.full_tensors) == set(b.full_tensors)
    for name in a.full_tensors:
        assert original.tensors[name].tobytes() == imported.tensors[name].tobytes()
        assert original.tensors[name].dtype == imported.tensors[name].dtype


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def plain_peft_dir(tmp_path_factory) -> Path:
    """A valid small PEFT LoRA directory (Llama, q_proj and v_proj), copied by tests."""
    tmp = tmp_path_factory.mktemp("plain")
    _, out = _peft_dir(Base("llama"), tmp, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit_config(peft_dir: Path, **changes) -> None:
    path = peft_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(peft_dir: Path, edit: Callable[[dict], None]) -> None:
    path = peft_dir / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(str(path))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _refused(
    peft_dir: Path, tmp_path: Path, match: str, error: type = asymlora.AdapterFormatError
) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(error, match=match):
        import_peft(peft_dir, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_dora(tmp_path):
    _, peft_dir = _peft_dir(
        Base("llama"), tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True
    )
    _refused(peft_dir, tmp_path, "use_dora: true enables DoRA")
    # DoRA tensors are refused even when the config does not say so.
    _edit_config(peft_dir, use_dora=False)
    _refused(peft_dir, tmp_path, "lora_magnitude_vector: a DoRA magnitude vector")


def test_refuses_pickle_only_dir(tmp_path):
    _, peft_dir = _peft_dir(Base("llama"), tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    (peft_dir / "adapter_model.safetensors").unlink()
    # Not a pickle at all: unpickling would fail differently; the file must not be opened.
    (peft_dir / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickle this")
    _refused(peft_dir, tmp_path, r"only adapter_model\.bin, a pickle")


def test_refuses_pickle_saved_by_peft(tmp_path):
    base = Base("llama")
    torch.manual_seed(0)
    model = peft.get_peft_model(base.fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    _refused(tmp_path / "bin", tmp_path, r"only adapter_model\.bin")


def test_refuses_bias_all(tmp_path):
    _, peft_dir = _peft_dir(
        Base("llama"), tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"], bias="all"
    )
    _refused(peft_dir, tmp_path, 'bias: "all" trains biases')


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(peft_type="IA3"), 'peft_type: is "IA3"'),
        (dict(lora_bias=True), "lora_bias: true"),
        (dict(alora_invocation_tokens=[1, 2]), "aLoRA"),
        (dict(layer_replication=[[0, 2], [1, 2]]), "layer replication"),
        (dict(r=3), "rank 2 but the config gives 3"),
        (
            dict(rank_pattern={"v_proj": 4}),
            "v_proj: the factors have rank 2 but the config gives 4",
        ),
    ],
)
def test_refuses_config(plain_peft_dir, tmp_path, change, match):
    peft_dir = _copy(plain_peft_dir, tmp_path)
    _edit_config(peft_dir, **change)
    _refused(peft_dir, tmp_path, match)


def _conv_factor(t: dict) -> None:
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = t[key][:, :, None, None].contiguous()


def _quantised(t: dict) -> None:
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = (t[key] * 100).to(torch.int8)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_conv_factor, "do not form a rank-r product"),
        (_quantised, "I8 is not F16/BF16/F32/F64"),
        (
            lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}),
            "unrecognised",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight": torch.ones(
                        2, 64
                    )
                }
            ),
            'adapter name "default"',
        ),
        (
            lambda t: t.pop(next(k for k in t if k.endswith("lora_B.weight"))),
            "lora_B.weight is missing",
        ),
    ],
)
def test_refuses_tensors(plain_peft_dir, tmp_path, edit, match):
    peft_dir = _copy(plain_peft_dir, tmp_path)
    _edit_tensors(peft_dir, edit)
    _refused(peft_dir, tmp_path, match)


def test_import_modules_to_save_skips_integer_buffers(plain_peft_dir, tmp_path):
    peft_dir = _copy(plain_peft_dir, tmp_path)
    _edit_config(peft_dir, modules_to_save=["norm"])
    weight = torch.linspace(0.5, 1.5, 64)

    def add(t: dict) -> None:
        t["base_model.model.model.norm.weight"] = weight
        t["base_model.model.model.norm.num_batches_tracked"] = torch.tensor(3)

    _edit_tensors(peft_dir, add)
    with pytest.warns(UserWarning, match="skipping the integer tensor .*num_batches_tracked"):
        path = import_peft(peft_dir, tmp_path / "a.safetensors")
    adapter = asymlora.read_adapter(path)
    assert adapter.config.full_tensors == ("model.norm.weight",)
    assert np.array_equal(adapter.tensors["model.norm.weight"], weight.numpy())


def test_interop_needs_no_torch_and_reproduces_peft_bytes(plain_peft_dir, tmp_path):
    code = (
        "import sys, asymlora\n"
        f"p = asymlora.import_peft({str(plain_peft_dir)!r}, {str(tmp_path / 'a.safetensors')!r})\n"
        f"asymlora.export_peft(p, {str(tmp_path / 'peft')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # PEFT -> asymlora -> PEFT reproduces PEFT's own weights file byte for byte.
    name = "adapter_model.safetensors"
    assert _files_equal(plain_peft_dir / name, tmp_path / "peft" / name)


def test_refuses_malformed_safetensors(plain_peft_dir, tmp_path):
    peft_dir = _copy(plain_peft_dir, tmp_path)
    weights = peft_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    _refused(peft_dir, tmp_path, "not a valid safetensors file: incomplete metadata")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _refused(peft_dir, tmp_path, "not a valid safetensors file: invalid JSON in header")


def test_refuses_missing_and_non_peft_dirs(tmp_path):
    _refused(tmp_path / "nope", tmp_path, "does not exist", FileNotFoundError)
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path, "no adapter_config.json")


def test_import_accepts_unprefixed_keys(plain_peft_dir, tmp_path):
    """transformers' own adapter saving drops the ``base_model.model.`` prefix."""
    peft_dir = _copy(plain_peft_dir, tmp_path)

    def strip(t: dict) -> None:
        for key in list(t):
            t[key.removeprefix("base_model.model.")] = t.pop(key)

    _edit_tensors(peft_dir, strip)
    a = asymlora.read_adapter(import_peft(plain_peft_dir, tmp_path / "a.safetensors"))
    b = asymlora.read_adapter(import_peft(peft_dir, tmp_path / "b.safetensors"))
    _assert_same_adapter(a, b)


def test_export_refuses_existing_dir(tmp_path):
    _, _, adapter_path = _wrapped_adapter(EXPORT_CASES["llama"], tmp_path)
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        export_peft(adapter_path, out)
    assert (out / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "peft"]

    export_peft(adapter_path, out, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "peft"]

    # overwrite never deletes what is not a PEFT adapter file.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not PEFT adapter files \(notes\.txt\)"):
        export_peft(adapter_path, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="not a directory"):
        export_peft(adapter_path, adapter_path, overwrite=True)


def test_export_refuses_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        export_peft(tmp_path / "nope.safetensors", tmp_path / "peft")
    _, _, adapter_path = _wrapped_adapter(EXPORT_CASES["llama"], tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_peft(adapter_path, tmp_path / "missing" / "peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_export_refuses_full_tensor_without_module(tmp_path):
    cfg = AdapterConfig(
        rank=2,
        alpha=2.0,
        seed=1,
        modules={"lin": ModuleConfig(d_in=4, d_out=3, stream=0)},
        full_tensors=("scale",),
    )
    tensors = {"lin.lora_B": np.ones((3, 2), "f4"), "scale": np.ones(3, "f4")}
    asymlora.write_adapter(tmp_path / "a.safetensors", cfg, tensors)
    with pytest.raises(ValueError, match="'scale' belongs to no submodule"):
        export_peft(tmp_path / "a.safetensors", tmp_path / "peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_lazy_exports():
    assert asymlora.export_peft is export_peft
    assert asymlora.import_peft is import_peft
