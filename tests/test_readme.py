"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has a python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    a = namespace["A"]
    assert a.shape == (16, 4096)
    np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.eye(16), atol=2e-6)
    assert (tmp_path / "adapter.safetensors").is_file()
    regenerated = namespace["ad"].lora_A("model.layers.0.self_attn.q_proj")
    assert regenerated.shape == (16, 4096)


def test_readme_torch_example_runs(tmp_path, monkeypatch):
    torch = __import__("pytest").importorskip("torch")
    __import__("pytest").importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    torch_blocks = [b for b in blocks if "asymlora.wrap(" in b]
    assert torch_blocks, "README has a torch example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(torch_blocks[0], str(README), "exec"), namespace)
    import asymlora

    adapter = asymlora.read_adapter(tmp_path / "adapter.safetensors")
    assert len(adapter.modules) == 4 and not any(
        m.a_stored for m in adapter.config.modules.values()
    )
    assert asymlora.nn.is_wrapped(namespace["fresh"])
