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
