"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str | None = None) -> list[str]:
    """The ```python blocks of the README, or of its ``## section`` only."""
    text = README.read_text()
    if section is not None:
        parts = re.split(r"^## ", text, flags=re.M)
        matching = [p for p in parts if p.startswith(section + "\n")]
        assert len(matching) == 1, f"README has one section '## {section}'"
        text = matching[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "README has a python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    a = namespace["A"]
    assert a.shape == (16, 4096)
    np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.eye(16), atol=2e-6)
    assert [m.shape for m in namespace["As"]] == [(16, 4096), (16, 11008)]


def test_readme_adapter_file_example_runs(tmp_path, monkeypatch):
    examples = [b for b in python_blocks() if "asymlora.write_adapter(" in b]
    assert examples, "README has an adapter-file example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(examples[0], str(README), "exec"), namespace)
    assert (tmp_path / "adapter.safetensors").is_file()
    regenerated = namespace["ad"].lora_A("model.layers.0.self_attn.q_proj")
    assert regenerated.shape == (16, 4096)


def test_readme_torch_example_runs(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    # the section's examples continue one another: train, save and load, PEFT, merge
    blocks = python_blocks("Training with torch")
    assert len(blocks) >= 4 and "asymlora.wrap(" in blocks[0], "README has a torch example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    import asymlora

    adapter = asymlora.read_adapter(tmp_path / "adapter.safetensors")
    assert len(adapter.modules) == 4 and not any(
        m.a_stored for m in adapter.config.modules.values()
    )
    assert asymlora.nn.is_wrapped(namespace["fresh"])
    # PEFT round trip: a directory PEFT reads, and a file with every A stored
    assert (tmp_path / "peft_dir" / "adapter_config.json").is_file()
    imported = asymlora.read_adapter(tmp_path / "from_peft.safetensors")
    assert set(imported.modules) == set(adapter.modules)
    assert all(m.a_stored for m in imported.config.modules.values())
    for name in adapter.modules:
        np.testing.assert_array_equal(imported.lora_A(name), adapter.lora_A(name))
        np.testing.assert_array_equal(imported.lora_B(name), adapter.lora_B(name))
    # merged and unwrapped at the end: plain modules again
    assert not asymlora.nn.is_wrapped(namespace["model"])
    # QLoRA: every projection adapted on its 4-bit layer, the file B-only
    qlayers = asymlora.nn.lora_layers(namespace["qmodel"])
    assert len(qlayers) == 14 and all(
        type(layer.base_layer).__name__ == "Linear4bit" for _, layer in qlayers
    )
    qlora = asymlora.read_adapter(tmp_path / "qlora.safetensors")
    assert len(qlora.modules) == 14 and not any(m.a_stored for m in qlora.config.modules.values())
