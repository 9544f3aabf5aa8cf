"""Adapter files: write/read round trips, the raw safetensors layout, validation on
write and on read (with files built by the real ``safetensors`` library), atomic
writes and the seed-plus-B size saving."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import asymlora
from asymlora import AdapterConfig, AdapterFormatError, ModuleConfig

SEED = 2024


def make_config(**overrides) -> AdapterConfig:
    """Four modules with different shapes: one per-module rank and alpha, one stored A,
    plus a fully trained classifier head."""
    modules = {
        "model.layers.0.self_attn.q_proj": ModuleConfig(d_in=16, d_out=16, stream=0),
        "model.layers.0.mlp.up_proj": ModuleConfig(d_in=16, d_out=40, stream=1),
        "model.layers.0.mlp.down_proj": ModuleConfig(
            d_in=40, d_out=16, stream=2, rank=2, alpha=3.0
        ),
        "model.layers.0.self_attn.v_proj": ModuleConfig(d_in=16, d_out=12, stream=3, a_stored=True),
    }
    fields = {
        "rank": 4,
        "alpha": 8.0,
        "seed": SEED,
        "modules": modules,
        "full_tensors": ("classifier.weight",),
    }
    fields.update(overrides)
    return AdapterConfig(**fields)


B_DTYPES = {
    "model.layers.0.self_attn.q_proj": np.float32,
    "model.layers.0.mlp.up_proj": np.float16,
    "model.layers.0.mlp.down_proj": ml_dtypes.bfloat16,
    "model.layers.0.self_attn.v_proj": np.float64,
}


def make_tensors(config: AdapterConfig, rng_seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    tensors: dict[str, np.ndarray] = {}
    for name, m in config.modules.items():
        r = config.module_rank(name)
        b = rng.standard_normal((m.d_out, r)) * 0.1
        tensors[f"{name}.lora_B"] = b.astype(B_DTYPES.get(name, np.float32))
        if m.a_stored:
            tensors[f"{name}.lora_A"] = rng.standard_normal((r, m.d_in)).astype(np.float32)
    for name in config.full_tensors:
        tensors[name] = rng.standard_normal((3, 16)).astype(np.float32)
    return tensors


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def config() -> AdapterConfig:
    return make_config()


@pytest.fixture
def tensors(config) -> dict[str, np.ndarray]:
    return make_tensors(config)


@pytest.fixture
def written(tmp_path, config, tensors) -> Path:
    path = tmp_path / "adapter.safetensors"
    asymlora.write_adapter(path, config, tensors)
    return path


# --------------------------------------------------------------------------- round trip


def test_public_api():
    assert issubclass(AdapterFormatError, ValueError)
    assert asymlora.FORMAT_VERSION == "1"
    assert asymlora.GENERATORS == ["haar-v1"]
    assert asymlora.__version__


def test_config_json_round_trip_in_python(config):
    again = AdapterConfig.from_json(config.to_json())
    assert again == config
    data = json.loads(config.to_json())
    assert "rank" not in data["modules"]["model.layers.0.mlp.up_proj"]  # None fields dropped
    assert data["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 2


def test_round_trip(written, config, tensors):
    adapter = asymlora.read_adapter(written)
    assert adapter.config == config
    assert adapter.path == written
    assert adapter.file_size == written.stat().st_size
    assert sorted(adapter.modules) == sorted(config.modules)
    assert sorted(adapter.tensors) == sorted(tensors)
    assert len(adapter.tensors) == len(tensors)
    for name, expected in tensors.items():
        got = adapter.tensors[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        assert bits(got) == bits(expected), name
    for name in config.modules:
        assert bits(adapter.lora_B(name)) == bits(tensors[f"{name}.lora_B"])
    assert "nope" not in adapter.tensors
    with pytest.raises(KeyError):
        adapter.tensors["nope"]
    with pytest.raises(KeyError, match="nope"):
        adapter.lora_A("nope")
    with pytest.raises(KeyError, match="nope"):
        adapter.lora_B("nope")
    assert "modules=4" in repr(adapter)


def test_read_accepts_str_path(written, config):
    assert asymlora.read_adapter(str(written)).config == config


def test_seeded_lora_a_is_regenerated(written, config):
    adapter = asymlora.read_adapter(written)
    for name, m in config.modules.items():
        if m.a_stored:
            continue
        expected = asymlora.random_orthogonal(
            config.module_rank(name),
            m.d_in,
            seed=config.seed,
            stream=m.stream,
            dtype=config.a_dtype,
            gain=config.a_gain,
        )
        a = adapter.lora_A(name)
        assert a.dtype == expected.dtype
        assert a.shape == (config.module_rank(name), m.d_in)
        assert bits(a) == bits(expected), name


def test_stored_lora_a_is_read(written, tensors):
    adapter = asymlora.read_adapter(written)
    name = "model.layers.0.self_attn.v_proj"
    a = adapter.lora_A(name)
    assert a.dtype == np.float32
    assert bits(a) == bits(tensors[f"{name}.lora_A"])


@pytest.mark.parametrize("a_dtype", ["float32", "float16", "bfloat16"])
def test_a_dtype_and_gain_round_trip(tmp_path, a_dtype):
    config = make_config(a_dtype=a_dtype, a_gain=0.5, seed=2**64 - 1, base_model={"id": "x"})
    path = tmp_path / "a.safetensors"
    asymlora.write_adapter(path, config, make_tensors(config))
    adapter = asymlora.read_adapter(path)
    assert adapter.config == config
    m = config.modules["model.layers.0.mlp.up_proj"]
    expected = asymlora.random_orthogonal(
        4, m.d_in, seed=2**64 - 1, stream=m.stream, dtype=a_dtype, gain=0.5
    )
    a = adapter.lora_A("model.layers.0.mlp.up_proj")
    assert a.dtype == expected.dtype
    assert bits(a) == bits(expected)


def test_tensors_are_copies(written, tensors):
    adapter = asymlora.read_adapter(written)
    name = "model.layers.0.self_attn.q_proj.lora_B"
    first = adapter.tensors[name]
    first[...] = 0
    assert bits(adapter.tensors[name]) == bits(tensors[name])


def test_non_contiguous_input_is_written_in_logical_order(tmp_path, config, tensors):
    name = "model.layers.0.self_attn.q_proj.lora_B"
    tensors[name] = np.asfortranarray(tensors[name])
    path = tmp_path / "f.safetensors"
    asymlora.write_adapter(path, config, tensors)
    np.testing.assert_array_equal(asymlora.read_adapter(path).tensors[name], tensors[name])


@pytest.mark.parametrize("scaling", ["alpha/r", "alpha/sqrt(r)"])
def test_scale_and_delta(tmp_path, scaling):
    config = make_config(scaling=scaling)
    tensors = make_tensors(config)
    path = tmp_path / "s.safetensors"
    asymlora.write_adapter(path, config, tensors)
    adapter = asymlora.read_adapter(path)
    assert adapter.config.scaling == scaling
    for name, m in config.modules.items():
        r = config.rank if m.rank is None else m.rank
        alpha = config.alpha if m.alpha is None else m.alpha
        expected_scale = alpha / r if scaling == "alpha/r" else alpha / math.sqrt(r)
        assert config.scale(name) == pytest.approx(expected_scale, rel=1e-15)
        b = tensors[f"{name}.lora_B"].astype(np.float64)
        a = adapter.lora_A(name).astype(np.float64)
        delta = adapter.delta(name)
        assert delta.dtype == np.float64
        assert delta.shape == (m.d_out, m.d_in)
        np.testing.assert_allclose(delta, expected_scale * (b @ a), rtol=1e-12, atol=1e-15)
    assert config.scale("model.layers.0.mlp.down_proj") == pytest.approx(
        3.0 / 2 if scaling == "alpha/r" else 3.0 / math.sqrt(2)
    )


def test_delta_of_seeded_module_has_rank_r(written, config):
    adapter = asymlora.read_adapter(written)
    name = "model.layers.0.self_attn.q_proj"
    assert np.linalg.matrix_rank(adapter.delta(name)) == config.module_rank(name)


def test_bad_scaling_is_rejected_before_writing(tmp_path, tensors):
    with pytest.raises(ValueError, match="scaling"):
        asymlora.write_adapter(tmp_path / "x.safetensors", make_config(scaling="alpha"), tensors)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- raw layout


def test_raw_file_with_safetensors(written, config, tensors):
    with safetensors.safe_open(str(written), framework="np") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        plain = {k: f.get_tensor(k) for k in keys if tensors[k].dtype != ml_dtypes.bfloat16}
    assert metadata["format"] == "asymlora"
    assert metadata["format_version"] == "1"
    stored_config = json.loads(metadata["asymlora_config"])
    assert stored_config["seed"] == SEED
    assert stored_config["generator"] == "haar-v1"
    assert stored_config["a_dtype"] == "float32"
    assert set(stored_config["modules"]) == set(config.modules)
    assert stored_config["modules"]["model.layers.0.self_attn.v_proj"]["a_stored"] is True
    assert stored_config["modules"]["model.layers.0.mlp.down_proj"]["stream"] == 2
    assert stored_config["full_tensors"] == ["classifier.weight"]
    assert AdapterConfig.from_json(metadata["asymlora_config"]) == config

    assert keys == set(tensors)
    for name, m in config.modules.items():
        assert f"{name}.lora_B" in keys
        assert (f"{name}.lora_A" in keys) == m.a_stored
    for name, value in plain.items():
        assert value.dtype == tensors[name].dtype
        assert bits(value) == bits(tensors[name])


def test_written_file_permissions_follow_umask(written):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644 & ~umask


# --------------------------------------------------------------------------- validation

Mutation = Callable[[AdapterConfig, dict], "tuple[AdapterConfig, dict]"]
Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"
V = "model.layers.0.self_attn.v_proj"


def with_module(config: AdapterConfig, name: str, **changes) -> AdapterConfig:
    modules = dict(config.modules)
    modules[name] = dataclasses.replace(modules[name], **changes)
    return dataclasses.replace(config, modules=modules)


def _b_shape(c, t):
    t[f"{Q}.lora_B"] = np.zeros((16, 5), np.float32)
    return c, t


def _b_missing(c, t):
    del t[f"{Q}.lora_B"]
    return c, t


def _a_unexpected(c, t):
    t[f"{Q}.lora_A"] = np.zeros((4, 16), np.float32)
    return c, t


def _a_stored_missing(c, t):
    del t[f"{V}.lora_A"]
    return c, t


def _a_stored_shape(c, t):
    t[f"{V}.lora_A"] = np.zeros((4, 15), np.float32)
    return c, t


def _generator(c, t):
    return dataclasses.replace(c, generator="haar-v9"), t


def _rank_too_big(c, t):
    c = with_module(c, UP, rank=17)
    t[f"{UP}.lora_B"] = np.zeros((40, 17), np.float32)
    return c, t


def _duplicate_stream(c, t):
    return with_module(c, UP, stream=0), t


def _stray(c, t):
    t["extra.weight"] = np.zeros((2, 2), np.float32)
    return c, t


def _full_missing(c, t):
    del t["classifier.weight"]
    return c, t


def _full_is_factor(c, t):
    return dataclasses.replace(c, full_tensors=("classifier.weight", f"{Q}.lora_B")), t


def _no_modules(c, t):
    return dataclasses.replace(c, modules={}, full_tensors=()), {}


def _d_in_zero(c, t):
    return with_module(c, UP, d_in=0), t


# The format's rules live in the core (checked on every write and read, naming the
# file); construction checks only what JSON needs to hold the format's types.
def _rank_zero(c, t):
    return dataclasses.replace(c, rank=0), t


def _module_rank_zero(c, t):
    return with_module(c, UP, rank=0), t


def _bad_scaling(c, t):
    return dataclasses.replace(c, scaling="alpha"), t


# (mutation, substrings the message must contain)
INVALID_CASES: dict[str, tuple[Mutation, tuple[str, ...]]] = {
    "b-shape": (_b_shape, (f'module "{Q}"', "lora_B", "shape", "[16, 5]", "[16, 4]")),
    "b-missing": (_b_missing, (f'module "{Q}"', "lora_B", "missing")),
    "a-present-not-stored": (_a_unexpected, (f'module "{Q}"', "a_stored", f"{Q}.lora_A")),
    "a-stored-missing": (_a_stored_missing, (f'module "{V}"', "lora_A", "missing")),
    "a-stored-shape": (_a_stored_shape, (f'module "{V}"', "lora_A", "shape")),
    "unknown-generator": (_generator, ("config.generator", "haar-v9", "haar-v1")),
    "rank-exceeds-d_in": (_rank_too_big, (f'module "{UP}"', "rank", "17", "16")),
    "duplicate-stream": (_duplicate_stream, ("stream", Q, UP)),
    "stray-tensor": (_stray, ('tensor "extra.weight"', "not described")),
    "full-tensor-missing": (_full_missing, ("config.full_tensors", "classifier.weight")),
    "full-tensor-is-factor": (_full_is_factor, ("config.full_tensors", f"{Q}.lora_B")),
    "no-modules": (_no_modules, ("config.modules", "empty")),
    "d_in-zero": (_d_in_zero, (f'module "{UP}"', "d_in")),
    "rank-zero": (_rank_zero, ("config.rank", "at least 1")),
    "module-rank-zero": (_module_rank_zero, (f'module "{UP}"', "rank", "at least 1")),
    "bad-scaling": (_bad_scaling, ("scaling", "alpha/sqrt(r)")),
}


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"seed": -1}, ("config.seed", "got -1")),
        ({"seed": 2**64}, ("config.seed",)),
        ({"alpha": float("nan")}, ("config.alpha", "finite")),
        ({"a_gain": float("inf")}, ("config.a_gain", "finite")),
        ({"rank": 4.0}, ("config.rank", "integer")),
    ],
)
def test_config_construction_names_the_bad_field(config, changes, needles):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(config, **changes)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"stream": -1}, ("stream", "got -1")),
        ({"alpha": float("nan")}, ("alpha", "finite")),
        ({"d_out": "8"}, ("d_out", "integer")),
    ],
)
def test_module_construction_names_module_and_field(config, changes, needles):
    with pytest.raises(ValueError) as info:
        with_module(config, UP, **changes)
    assert f"module {UP!r}" in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_write_raises_and_leaves_nothing(tmp_path, config, tensors, case):
    mutate, expected = INVALID_CASES[case]
    bad_config, bad_tensors = mutate(config, dict(tensors))
    path = tmp_path / "bad.safetensors"
    with pytest.raises(AdapterFormatError) as excinfo:
        asymlora.write_adapter(path, bad_config, bad_tensors)
    message = str(excinfo.value)
    assert str(path) in message
    for part in expected:
        assert part in message, (part, message)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("case", ["b-shape", "unknown-generator", "stray-tensor"])
def test_invalid_write_keeps_existing_file(written, config, tensors, case):
    before = written.read_bytes()
    bad_config, bad_tensors = INVALID_CASES[case][0](config, dict(tensors))
    with pytest.raises(AdapterFormatError):
        asymlora.write_adapter(written, bad_config, bad_tensors)
    assert written.read_bytes() == before
    assert listing(written.parent) == [written.name]


def test_stored_modules_may_share_streams_and_exceed_d_in(tmp_path, config, tensors):
    """Distinct streams and r <= d_in are only required of generated A's."""
    config = with_module(config, V, stream=0, rank=20)
    tensors[f"{V}.lora_B"] = np.zeros((12, 20), np.float32)
    tensors[f"{V}.lora_A"] = np.zeros((20, 16), np.float32)
    path = tmp_path / "ok.safetensors"
    asymlora.write_adapter(path, config, tensors)
    assert asymlora.read_adapter(path).lora_A(V).shape == (20, 16)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.bool_, np.complex64, ">f4"])
def test_non_float_dtype_is_a_value_error(tmp_path, config, tensors, dtype):
    tensors[f"{Q}.lora_B"] = tensors[f"{Q}.lora_B"].astype(dtype)
    with pytest.raises(ValueError, match=rf"'{Q}.lora_B'.*dtype") as excinfo:
        asymlora.write_adapter(tmp_path / "x.safetensors", config, tensors)
    assert not isinstance(excinfo.value, AdapterFormatError)
    assert listing(tmp_path) == []


def test_write_into_missing_directory(tmp_path, config, tensors):
    with pytest.raises(FileNotFoundError):
        asymlora.write_adapter(tmp_path / "no" / "such" / "a.safetensors", config, tensors)
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- reading bad files


def save_raw(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> Path:
    """Writes a safetensors file with the real library (float32 tensors only)."""
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(path),
        metadata=metadata,
    )
    return path


def good_metadata(config: AdapterConfig) -> dict[str, str]:
    return {"format": "asymlora", "format_version": "1", "asymlora_config": config.to_json()}


def read_error(path: Path, exc: type[BaseException] = AdapterFormatError) -> str:
    with pytest.raises(exc) as excinfo:
        asymlora.read_adapter(path)
    message = str(excinfo.value)
    assert str(path) in message
    return message


def test_raw_valid_file_reads(tmp_path, config, tensors):
    path = save_raw(tmp_path / "ok.safetensors", tensors, good_metadata(config))
    adapter = asymlora.read_adapter(path)
    assert adapter.config == config
    np.testing.assert_array_equal(adapter.lora_B(UP), tensors[f"{UP}.lora_B"].astype(np.float32))


def test_read_no_metadata(tmp_path, tensors):
    """A PEFT adapter or plain checkpoint has no asymlora metadata."""
    message = read_error(save_raw(tmp_path / "peft.safetensors", tensors, None))
    assert "__metadata__" in message
    assert "not an asymlora adapter" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"format": "pt"}, ("__metadata__.format", '"pt"', "not an asymlora adapter")),
        ({"format": None}, ("__metadata__.format", "missing")),
        ({"format_version": "2"}, ("__metadata__.format_version", '"2"', "upgrade")),
        ({"format_version": None}, ("__metadata__.format_version", "missing")),
        ({"asymlora_config": None}, ("__metadata__.asymlora_config", "missing")),
        ({"asymlora_config": "{not json"}, ("asymlora_config", "invalid config", "not valid JSON")),
        (
            {"asymlora_config": "[]"},
            ("asymlora_config", "invalid config", "expected struct AdapterConfig"),
        ),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_read_bad_metadata(tmp_path, config, tensors, change, expected):
    metadata = good_metadata(config)
    for key, value in change.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    message = read_error(save_raw(tmp_path / "m.safetensors", tensors, metadata))
    for part in expected:
        assert part in message, (part, message)


def test_read_config_missing_required_field(tmp_path, config, tensors):
    data = json.loads(config.to_json())
    del data["seed"]
    metadata = {**good_metadata(config), "asymlora_config": json.dumps(data)}
    message = read_error(save_raw(tmp_path / "m.safetensors", tensors, metadata))
    assert "seed" in message


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_read_side_validation(tmp_path, config, tensors, case):
    """The same checks run when reading a file someone else wrote."""
    mutate, expected = INVALID_CASES[case]
    bad_config, bad_tensors = mutate(config, dict(tensors))
    path = save_raw(tmp_path / "bad.safetensors", bad_tensors, good_metadata(bad_config))
    message = read_error(path)
    for part in expected:
        assert part in message, (part, message)


def test_read_non_float_tensor(tmp_path, config, tensors):
    raw = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    raw[f"{Q}.lora_B"] = raw[f"{Q}.lora_B"].astype(np.int32)
    path = tmp_path / "int.safetensors"
    safetensors.numpy.save_file(raw, str(path), metadata=good_metadata(config))
    message = read_error(path)
    assert f'module "{Q}"' in message
    assert "floating-point" in message


@pytest.mark.parametrize("cut", [1, 100, "data", "header"])
def test_read_truncated_file(tmp_path, written, cut):
    data = written.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    keep = {
        "data": 8 + header_len + 10,
        "header": 8 + header_len // 2,
    }.get(cut, len(data) - cut if isinstance(cut, int) else 0)
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:keep])
    read_error(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, "random", b"not a safetensors file at all"])
def test_read_garbage(tmp_path, content):
    if content == "random":
        content = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    read_error(path)


def test_read_missing_file(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as excinfo:
        asymlora.read_adapter(path)
    assert not isinstance(excinfo.value, ValueError)
    assert str(path) in str(excinfo.value)


def test_read_directory_is_os_error(tmp_path):
    read_error(tmp_path, OSError)


def test_read_directory_is_is_a_directory_error(tmp_path):
    with pytest.raises(IsADirectoryError):
        asymlora.read_adapter(tmp_path)


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"a_gain": float("nan")}, "a_gain"),
        ({"seed": -1}, "seed"),
    ],
    ids=["alpha-nan", "alpha-inf", "a_gain-nan", "seed-negative"],
)
def test_invalid_config_values_name_the_field(tmp_path, tensors, change, field):
    with pytest.raises(ValueError) as excinfo:
        asymlora.write_adapter(tmp_path / "x.safetensors", make_config(**change), tensors)
    assert field in str(excinfo.value)


def test_non_finite_config_values_are_rejected(tmp_path, tensors):
    """Whatever the message, a non-finite alpha never reaches a file."""
    with pytest.raises(ValueError):
        asymlora.write_adapter(tmp_path / "x.safetensors", make_config(alpha=float("nan")), tensors)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"a_dtype": "int8"}, "dtype")],
)
def test_out_of_range_config_values_are_rejected(tmp_path, tensors, change, field):
    with pytest.raises(ValueError) as excinfo:
        asymlora.write_adapter(tmp_path / "x.safetensors", make_config(**change), tensors)
    assert listing(tmp_path) == []
    if field == "dtype":
        assert "dtype" in str(excinfo.value)


# --------------------------------------------------------------------------- atomic overwrite


def test_overwrite_replaces_atomically(tmp_path, config, tensors):
    path = tmp_path / "adapter.safetensors"
    asymlora.write_adapter(path, config, tensors)
    old = asymlora.read_adapter(path)
    old_b = bits(old.lora_B(UP))

    new_config = dataclasses.replace(config, seed=SEED + 1, alpha=1.0)
    new_tensors = make_tensors(new_config, rng_seed=1)
    asymlora.write_adapter(path, new_config, new_tensors)

    new = asymlora.read_adapter(path)
    assert new.config == new_config
    assert bits(new.lora_B(UP)) == bits(new_tensors[f"{UP}.lora_B"])
    assert bits(new.lora_A(UP)) != bits(old.lora_A(UP))
    # the old file was replaced by a rename, not rewritten in place: an adapter
    # opened before still sees its own (memory-mapped) content
    assert bits(old.lora_B(UP)) == old_b
    assert old.config == config
    assert listing(tmp_path) == [path.name]


# --------------------------------------------------------------------------- size


def size_config(a_stored: bool, d: int = 512, r: int = 16, n: int = 4) -> AdapterConfig:
    modules = {
        f"layers.{i}.proj": ModuleConfig(d_in=d, d_out=d, stream=i, a_stored=a_stored)
        for i in range(n)
    }
    return AdapterConfig(rank=r, alpha=2.0 * r, seed=1, modules=modules)


def size_tensors(config: AdapterConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, m in config.modules.items():
        out[f"{name}.lora_B"] = rng.standard_normal((m.d_out, config.rank)).astype(np.float32)
        if m.a_stored:
            out[f"{name}.lora_A"] = asymlora.random_orthogonal(
                config.rank, m.d_in, seed=config.seed, stream=m.stream
            )
    return out


def test_seeded_file_is_about_half_of_stored(tmp_path):
    sizes = {}
    for a_stored in (False, True):
        config = size_config(a_stored)
        path = tmp_path / f"stored-{a_stored}.safetensors"
        asymlora.write_adapter(path, config, size_tensors(config))
        sizes[a_stored] = path.stat().st_size
    ratio = sizes[False] / sizes[True]
    assert 0.45 <= ratio <= 0.56, sizes

    # both describe the same update
    seeded = asymlora.read_adapter(tmp_path / "stored-False.safetensors")
    stored = asymlora.read_adapter(tmp_path / "stored-True.safetensors")
    for name in seeded.modules:
        np.testing.assert_array_equal(seeded.delta(name), stored.delta(name))


def test_inspect_reports_sizes(tmp_path):
    config = size_config(False)
    path = tmp_path / "seeded.safetensors"
    asymlora.write_adapter(path, config, size_tensors(config))
    report = asymlora.read_adapter(path).inspect()
    size = path.stat().st_size
    a_bytes = sum(config.rank * m.d_in * 4 for m in config.modules.values())
    assert f"({size} bytes)" in report
    assert f"({size + a_bytes} bytes" in report
    assert "as LoRA" in report
    for name in config.modules:
        assert name in report


# --------------------------------------------------------------------------- odd tensors


def test_write_onto_directory_leaves_no_temp_file(tmp_path, config, tensors):
    target = tmp_path / "adapter.safetensors"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        asymlora.write_adapter(target, config, tensors)
    assert listing(tmp_path) == [target.name]
    assert listing(target) == []


def test_one_dimensional_full_tensor_round_trips(tmp_path):
    config = make_config(full_tensors=("head.bias",))
    tensors = make_tensors(config)
    tensors["head.bias"] = np.arange(16, dtype=np.float16)
    path = tmp_path / "bias.safetensors"
    asymlora.write_adapter(path, config, tensors)
    got = asymlora.read_adapter(path).tensors["head.bias"]
    assert got.dtype == np.float16
    assert got.shape == (16,)
    np.testing.assert_array_equal(got, tensors["head.bias"])


def test_scalar_full_tensor_keeps_its_shape(tmp_path):
    config = make_config(full_tensors=("logit_scale",))
    tensors = make_tensors(config)
    tensors["logit_scale"] = np.array(2.5, dtype=np.float32)
    path = tmp_path / "scalar.safetensors"
    asymlora.write_adapter(path, config, tensors)
    assert asymlora.read_adapter(path).tensors["logit_scale"].shape == ()


def test_non_float_full_tensor_in_file(tmp_path, config, tensors):
    raw = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    raw["classifier.weight"] = np.arange(48, dtype=np.int32).reshape(3, 16)
    path = tmp_path / "int-full.safetensors"
    safetensors.numpy.save_file(raw, str(path), metadata=good_metadata(config))
    message = read_error(path)
    assert 'tensor "classifier.weight"' in message
    assert "floating-point" in message


# --------------------------------------------------------------------------- config spec
# docs/adapter-format-v1.md, "Config" and "Validation"


def config_file(tmp_path: Path, tensors: dict, change: Callable[[dict], object]) -> Path:
    """A file whose config JSON is the default one edited by ``change``."""
    data = json.loads(make_config().to_json())
    change(data)
    metadata = {
        "format": "asymlora",
        "format_version": "1",
        "asymlora_config": json.dumps(data),
    }
    return save_raw(tmp_path / "spec.safetensors", tensors, metadata)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(foo=1), ("unknown field", "foo")),
        (lambda d: d["modules"][Q].update(foo=1), ("unknown field", "foo")),
        (lambda d: d.update(rank=4.0), ("asymlora_config", "4.0")),
        (lambda d: d.update(seed=float(SEED)), ("asymlora_config", "2024.0")),
        (lambda d: d["modules"][Q].update(stream=0.0), ("asymlora_config", "0.0")),
        (lambda d: d.update(seed=2**64), ("asymlora_config",)),
        (lambda d: d.update(a_dtype="f32"), ('"f32"', "float32")),
        (lambda d: d.update(scaling="alpha"), ("alpha/r",)),
        (lambda d: d.pop("generator"), ("missing field", "generator")),
        (lambda d: d["modules"][Q].pop("a_stored"), ("missing field", "a_stored")),
        (lambda d: d.update(a_gain=0), ("config.a_gain", "non-zero")),
        (lambda d: d.update(base_model=[1]), ("config.base_model", "object")),
        (lambda d: d.update(base_model="llama"), ("config.base_model", "object")),
        (lambda d: d["modules"].update({"": d["modules"].pop(Q)}), ("config.modules", "empty")),
        (
            lambda d: d.update(full_tensors=["classifier.weight", "classifier.weight"]),
            ("config.full_tensors", "twice"),
        ),
        (
            lambda d: d.update(full_tensors=["classifier.weight", f"{Q}.lora_A"]),
            ("config.full_tensors", f"{Q}.lora_A", "factor"),
        ),
    ],
    ids=[
        "unknown-field",
        "unknown-module-field",
        "rank-float",
        "seed-float",
        "stream-float",
        "seed-2**64",
        "a_dtype-alias",
        "scaling-unknown",
        "generator-missing",
        "a_stored-missing",
        "a_gain-zero",
        "base_model-list",
        "base_model-string",
        "module-name-empty",
        "full-tensor-twice",
        "full-tensor-seeded-lora_A",
    ],
)
def test_config_spec_violations_are_refused(tmp_path, tensors, change, expected):
    message = read_error(config_file(tmp_path, tensors, change))
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(rank=4.0), ("rank",)),
        (lambda d: d.update(seed=2**64), ("seed",)),
        (lambda d: d["modules"][Q].update(stream=0.0), (Q, "stream")),
        (lambda d: d["modules"][Q].update(d_in=-1), (Q, "d_in")),
    ],
    ids=["rank-float", "seed-2**64", "stream-float", "d_in-negative"],
)
def test_config_type_errors_name_the_field(tmp_path, tensors, change, expected):
    message = read_error(config_file(tmp_path, tensors, change))
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(base_model=None),
        lambda d: d["modules"][Q].update(rank=None, alpha=None),
        lambda d: d.update(alpha=0.0),
        lambda d: d.update(alpha=-2.0),
        lambda d: d.update(a_gain=-1.0),
        lambda d: d.update(seed=2**64 - 1),
        lambda d: d.pop("scaling"),
        lambda d: d.pop("a_gain"),
    ],
    ids=[
        "base_model-null",
        "module-overrides-null",
        "alpha-zero",
        "alpha-negative",
        "a_gain-negative",
        "seed-max",
        "scaling-absent",
        "a_gain-absent",
    ],
)
def test_config_spec_allowed_values(tmp_path, tensors, change):
    adapter = asymlora.read_adapter(config_file(tmp_path, tensors, change))
    c = adapter.config
    expected_a = asymlora.random_orthogonal(
        c.module_rank(Q), c.modules[Q].d_in, seed=c.seed, stream=c.modules[Q].stream, gain=c.a_gain
    )
    assert bits(adapter.lora_A(Q)) == bits(expected_a)
    assert c.scaling in ("alpha/r", "alpha/sqrt(r)")


def test_negative_a_gain_negates_a(tmp_path, tensors):
    plain = asymlora.read_adapter(config_file(tmp_path, tensors, lambda d: None)).lora_A(Q)
    flipped = asymlora.read_adapter(
        config_file(tmp_path, tensors, lambda d: d.update(a_gain=-1.0))
    ).lora_A(Q)
    np.testing.assert_array_equal(flipped, -plain)


@pytest.mark.parametrize("field", ["a_gain", "scaling", "full_tensors"])
def test_optional_top_level_null_counts_as_absent(tmp_path, field):
    config = make_config(full_tensors=())
    tensors = make_tensors(config)
    data = json.loads(config.to_json())
    data[field] = None
    metadata = {"format": "asymlora", "format_version": "1", "asymlora_config": json.dumps(data)}
    adapter = asymlora.read_adapter(save_raw(tmp_path / "null.safetensors", tensors, metadata))
    assert adapter.config == config


def test_other_metadata_keys_are_ignored(tmp_path, config, tensors):
    metadata = {**good_metadata(config), "producer": "someone else", "format_notes": "x"}
    adapter = asymlora.read_adapter(save_raw(tmp_path / "extra.safetensors", tensors, metadata))
    assert adapter.config == config


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"a_gain": 0.0}, "config.a_gain"),
        ({"base_model": [1, 2]}, "config.base_model"),
        ({"generator": "haar-v2"}, "config.generator"),
    ],
)
def test_config_spec_on_write(tmp_path, change, location):
    config = make_config(**change)
    with pytest.raises(AdapterFormatError, match=location):
        asymlora.write_adapter(tmp_path / "w.safetensors", config, make_tensors(config))
    assert listing(tmp_path) == []


def test_written_config_json_is_compact_and_sorted(written):
    with safetensors.safe_open(str(written), framework="np") as f:
        text = f.metadata()["asymlora_config"]
    assert ", " not in text and ": " not in text
    data = json.loads(text)
    assert list(data["modules"]) == sorted(data["modules"])
    assert "a_gain" not in data  # omitted when 1
    assert "base_model" not in data
    assert "rank" not in data["modules"][Q] and "alpha" not in data["modules"][Q]


# --------------------------------------------------------------------------- documented example


DOC_INSPECT = """\
adapter     {path}
format      asymlora v1 (seed-plus-B)
generator   haar-v1  seed 1234  A dtype float32
rank        4  alpha 8  scaling alpha/r
modules     4 (1 with stored A, 3 regenerated from the seed)
full        score.weight

module                   d_out x d_in  rank  stream  A       B dtype
layers.0.attn.q_proj          64 x 64     4       0  seeded  F32
layers.0.attn.v_proj          64 x 64     4       1  seeded  F32
layers.0.mlp.down_proj       64 x 256     4       3  stored  F32
layers.0.mlp.up_proj         256 x 64     8       2  seeded  F32

file size   16.6 KiB (17048 bytes)
as LoRA     20.6 KiB (21144 bytes, every A stored in float32): this file is 0.806x of it
"""

DOC_CONFIG = {
    "rank": 4,
    "alpha": 8.0,
    "scaling": "alpha/r",
    "seed": 1234,
    "generator": "haar-v1",
    "a_dtype": "float32",
    "modules": {
        "layers.0.attn.q_proj": {"d_in": 64, "d_out": 64, "stream": 0, "a_stored": False},
        "layers.0.attn.v_proj": {"d_in": 64, "d_out": 64, "stream": 1, "a_stored": False},
        "layers.0.mlp.down_proj": {"d_in": 256, "d_out": 64, "stream": 3, "a_stored": True},
        "layers.0.mlp.up_proj": {
            "d_in": 64,
            "d_out": 256,
            "stream": 2,
            "a_stored": False,
            "rank": 8,
            "alpha": 16.0,
        },
    },
    "full_tensors": ["score.weight"],
    "base_model": {"name": "tiny-test"},
}


def test_documented_example(tmp_path, monkeypatch):
    """The example in docs/adapter-format-v1.md, run as written (in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    cfg = AdapterConfig(
        rank=4,
        alpha=8.0,
        seed=1234,
        modules={
            "layers.0.attn.q_proj": ModuleConfig(d_in=64, d_out=64, stream=0),
            "layers.0.attn.v_proj": ModuleConfig(d_in=64, d_out=64, stream=1),
            "layers.0.mlp.up_proj": ModuleConfig(d_in=64, d_out=256, stream=2, rank=8, alpha=16.0),
            "layers.0.mlp.down_proj": ModuleConfig(d_in=256, d_out=64, stream=3, a_stored=True),
        },
        full_tensors=("score.weight",),
        base_model={"name": "tiny-test"},
    )
    rng = np.random.default_rng(0)
    t = {}
    for name, m in cfg.modules.items():
        r = cfg.module_rank(name)
        t[f"{name}.lora_B"] = rng.standard_normal((m.d_out, r)).astype(np.float32)
        if m.a_stored:
            t[f"{name}.lora_A"] = asymlora.random_orthogonal(r, m.d_in, seed=99, stream=0)
    t["score.weight"] = rng.standard_normal((2, 64)).astype(np.float32)
    asymlora.write_adapter("tiny.safetensors", cfg, t)

    ad = asymlora.read_adapter("tiny.safetensors")
    assert np.array_equal(
        ad.lora_A("layers.0.attn.q_proj"), asymlora.random_orthogonal(4, 64, seed=1234, stream=0)
    )
    with safetensors.safe_open("tiny.safetensors", framework="np") as f:
        assert json.loads(f.metadata()["asymlora_config"]) == DOC_CONFIG
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "layers.0.attn.q_proj.lora_B": [64, 4],
        "layers.0.attn.v_proj.lora_B": [64, 4],
        "layers.0.mlp.down_proj.lora_A": [4, 256],
        "layers.0.mlp.down_proj.lora_B": [64, 4],
        "layers.0.mlp.up_proj.lora_B": [256, 8],
        "score.weight": [2, 64],
    }
    assert ad.inspect() == DOC_INSPECT.format(path="tiny.safetensors")


def test_documented_llama_sizes():
    """The 'Size' section: Llama-2-7B shaped, r = 16 (the demo's module table)."""
    from asymlora.generator_check import llama2_7b_modules

    modules = llama2_7b_modules()
    assert len(modules) == 32 * 7
    assert sorted(m.stream for m in modules.values()) == list(range(224))
    b_values = sum(m.d_out * 16 for m in modules.values())
    classic = sum((m.d_out + m.d_in) * 16 for m in modules.values())
    assert (b_values, classic) == (21_757_952, 39_976_960)
    assert round(100 * b_values / classic) == 54
