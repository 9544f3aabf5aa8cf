"""The ``asymlora`` console command, run as a subprocess like a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import asymlora
from asymlora import AdapterConfig, ModuleConfig


def run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory) -> Path:
    modules = {
        "encoder.attn.q": ModuleConfig(d_in=64, d_out=48, stream=11),
        "encoder.mlp.fc1": ModuleConfig(d_in=48, d_out=96, stream=12, rank=4),
        "encoder.mlp.fc2": ModuleConfig(d_in=96, d_out=48, stream=13, a_stored=True),
    }
    config = AdapterConfig(
        rank=8, alpha=16.0, seed=31337, modules=modules, full_tensors=("classifier.weight",)
    )
    rng = np.random.default_rng(0)
    tensors = {
        "encoder.attn.q.lora_B": rng.standard_normal((48, 8)).astype(np.float32),
        "encoder.mlp.fc1.lora_B": rng.standard_normal((96, 4)).astype(np.float16),
        "encoder.mlp.fc2.lora_B": rng.standard_normal((48, 8)).astype(np.float32),
        "encoder.mlp.fc2.lora_A": rng.standard_normal((8, 96)).astype(np.float32),
        "classifier.weight": rng.standard_normal((2, 48)).astype(np.float32),
    }
    path = tmp_path_factory.mktemp("cli") / "adapter.safetensors"
    asymlora.write_adapter(path, config, tensors)
    return path


def test_inspect(cli_path, adapter_path):
    proc = run([cli_path, "inspect", adapter_path])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    size = adapter_path.stat().st_size
    for expected in (
        str(adapter_path),
        "haar-v1",
        "seed 31337",
        "rank        8",
        "alpha 16",
        "alpha/r",
        "encoder.attn.q",
        "encoder.mlp.fc1",
        "encoder.mlp.fc2",
        "48 x 64",  # d_out x d_in
        "96 x 48",
        "48 x 96",
        "classifier.weight",
        "seeded",
        "stored",
        "F16",
        f"({size} bytes)",
        "as LoRA",
    ):
        assert expected in out, (expected, out)
    # rows: name, shape, rank, stream
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("encoder.")
    }
    assert rows["encoder.attn.q"][4:7] == ["8", "11", "seeded"]
    assert rows["encoder.mlp.fc1"][4:7] == ["4", "12", "seeded"]
    assert rows["encoder.mlp.fc2"][4:7] == ["8", "13", "stored"]
    # classic-LoRA size: every seeded A stored in float32
    a_bytes = (8 * 64 + 4 * 48) * 4
    assert f"({size + a_bytes} bytes" in out
    assert proc.stderr == ""


def test_inspect_output_equals_python_api(cli_path, adapter_path):
    proc = run([cli_path, "inspect", adapter_path])
    assert proc.stdout == asymlora.read_adapter(adapter_path).inspect()


@pytest.mark.parametrize("kind", ["garbage", "no-metadata", "missing", "format-v2"])
def test_inspect_invalid_file(cli_path, tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    tensors = {"a.lora_B": np.zeros((2, 2), np.float32)}
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 1000, np.uint8).tobytes())
    elif kind == "no-metadata":
        safetensors.numpy.save_file(tensors, str(path))
    elif kind == "format-v2":
        metadata = {"format": "asymlora", "format_version": "2", "asymlora_config": "{}"}
        safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    proc = run([cli_path, "inspect", path])
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0]
    assert "error" in lines[0]
    if kind == "format-v2":
        assert "upgrade" in lines[0]


def test_help_lists_commands(cli_path):
    proc = run([cli_path, "--help"])
    assert proc.returncode == 0
    assert "inspect" in proc.stdout
    assert "demo" in proc.stdout


def test_no_command_is_a_usage_error(cli_path):
    proc = run([cli_path])
    assert proc.returncode == 2
    assert "Usage" in proc.stderr or "usage" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command(cli_path):
    proc = run([cli_path, "frobnicate"])
    assert proc.returncode == 2
    assert "frobnicate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version(cli_path):
    proc = run([cli_path, "--version"])
    assert proc.returncode == 0
    assert proc.stdout.split()[0] == "asymlora"
    assert proc.stdout.split()[1] == asymlora.__version__


def test_generator_check(cli_path, tmp_path):
    out = tmp_path / "demo"
    proc = run([cli_path, "generator-check", "--out", out, "--layers", "2"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].split() == ["result", "OK"]
    table = {line.split()[0]: line.split() for line in lines if line.split()[:1] != []}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        row = table[kind]
        assert row[1] == "2", row  # count: one per layer
        assert "same bits" in " ".join(row)
    assert table["q_proj"][-1] == "ok"  # stream 0 (layer 0 q_proj) is pinned for seed 0
    assert table["down_proj"][-1] == "ok"  # stream 6 (layer 0 down_proj)

    report = json.loads((out / "generator-check.json").read_text())
    assert report["ok"] is True
    assert report["modules"] == 14
    assert report["seed"] == 0 and report["rank"] == 16
    assert report["rows"]["q_proj"]["golden"] == "ok"
    assert report["rows"]["down_proj"]["golden"] == "ok"
    assert report["rows"]["down_proj"]["shape"] == [16, 11008]
    for row in report["rows"].values():
        assert row["max_orth_err"] <= 2e-6
        assert row["threads_agree"] and row["file_agrees"]
    adapter = Path(report["adapter"])
    assert adapter.exists()
    assert report["file_bytes"] == adapter.stat().st_size
    assert 0.5 < report["file_bytes"] / report["classic_lora_bytes"] < 0.6
    opened = asymlora.read_adapter(adapter)
    assert len(opened.modules) == 14
    assert opened.config.seed == 0


def test_generator_check_other_seed_has_no_golden(cli_path, tmp_path):
    proc = run(
        [
            cli_path,
            "generator-check",
            "--out",
            tmp_path,
            "--layers",
            "1",
            "--seed",
            "5",
            "--rank",
            "4",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "generator-check.json").read_text())
    assert report["ok"] is True
    assert {row["golden"] for row in report["rows"].values()} == {"n/a"}
    assert report["rows"]["q_proj"]["shape"] == [4, 4096]


def test_generator_check_bad_arguments_give_one_line_error(cli_path, tmp_path):
    proc = run([cli_path, "generator-check", "--out", tmp_path, "--layers", "0"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_generator_check_help(cli_path):
    proc = run([cli_path, "generator-check", "--help"])
    assert proc.returncode == 0
    for option in ("--out", "--layers", "--seed", "--rank"):
        assert option in proc.stdout


_NO_TORCH = """
import sys, tempfile, pathlib
import asymlora
from asymlora import cli
asymlora.random_orthogonal(2, 4, seed=0)
asymlora.random_orthogonal_many([(2, 4)], seed=0, streams=[0], dtype="bfloat16")
with tempfile.TemporaryDirectory() as d:
    assert cli.main(["generator-check", "--out", d, "--layers", "1", "--rank", "2"]) == 0
    path = next(pathlib.Path(d).glob("*.safetensors"))
    adapter = asymlora.read_adapter(path)
    adapter.lora_A(adapter.modules[0])
    assert cli.main(["inspect", str(path)]) == 0
assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
print("no torch")
"""


def test_torch_is_not_imported(tmp_path):
    simple = run(
        [
            sys.executable,
            "-c",
            "import asymlora, sys; asymlora.random_orthogonal(2, 4, seed=0); "
            "assert 'torch' not in sys.modules",
        ]
    )
    assert simple.returncode == 0, simple.stderr
    full = run([sys.executable, "-c", _NO_TORCH], cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert full.stdout.strip().endswith("no torch")


def test_help_imports_no_heavy_library():
    # What keeps `asymlora --help` fast: the console entry point never imports torch,
    # transformers or peft (start-up time itself belongs in a benchmark, not a test).
    code = (
        "import contextlib, io, sys\n"
        "from asymlora.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "heavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
