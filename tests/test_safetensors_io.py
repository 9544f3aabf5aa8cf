"""The core's plain safetensors reader/writer, checked against the safetensors library."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import asymlora
from asymlora._safetensors import SafetensorsFile, write_safetensors


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.weight": rng.standard_normal((4,)).astype(np.float16),
        "c": rng.standard_normal((2, 2)),
    }


def test_written_files_load_with_the_safetensors_library(tmp_path):
    tensors = sample()
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt", "k": "v"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)
    # same layout as the library's own writer (only the metadata map order is fixed)
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "lib.safetensors").read_bytes() == (
        tmp_path / "ours.safetensors"
    ).read_bytes()


def test_same_content_same_bytes_and_bf16_bits(tmp_path):
    tensors = {"w": np.arange(-8, 8, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(4, 4)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    blobs = set()
    for i in range(4):
        write_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    st = SafetensorsFile(tmp_path / "0.safetensors")
    assert st.metadata == metadata
    assert st.entries["w"].dtype == "BF16" and st.entries["w"].shape == (4, 4)
    out = st.read({"x": "w"})["x"]
    assert out.dtype == ml_dtypes.bfloat16
    assert np.array_equal(out.view(np.uint16), tensors["w"].view(np.uint16))


def test_malformed_files_raise_safetensors_error(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, sample(), {})
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(asymlora.SafetensorsError, match="not a valid safetensors file"):
        SafetensorsFile(path)
    with pytest.raises(FileNotFoundError):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a float dtype"):
        write_safetensors(path, {"i": np.arange(3)}, {})
