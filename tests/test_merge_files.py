"""Offline merge (``asymlora.merge_files`` and ``asymlora merge``) against real PEFT.

Tiny transformers models are built from configs (nothing is downloaded) and saved as
sharded bf16 checkpoints with ``save_pretrained(max_shard_size=...)``; PEFT adapters are
made and saved by real PEFT. Every merged value must equal the float64 reference
``round(W + sum w_i s_i B_i A_i)`` rounded once, and PEFT's own ``merge_and_unload`` must
agree within one bf16 ulp.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _reference import round_once as _round_once

import asymlora
from asymlora import AdapterConfig, ModuleConfig
from asymlora._safetensors import SafetensorsFile

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

README = Path(__file__).resolve().parents[1] / "README.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------- helpers


def _llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )


def _read_dir(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint file or directory, as numpy (bf16 as ml_dtypes)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, np.ndarray] = {}
    for f in files:
        st = SafetensorsFile(f)
        out.update(st.read({n: n for n in st.names if st.entries[n].dtype != "I64"}))
    return out


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between two bf16 arrays."""

    def ordered(x: np.ndarray) -> np.ndarray:
        bits = x.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)

    return np.abs(ordered(a) - ordered(b))


def _peft_deltas(peft_dir: Path) -> dict[str, np.ndarray]:
    """``s * B @ A`` in float64 for every module of a PEFT directory (exact factors)."""
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    st = SafetensorsFile(peft_dir / "adapter_model.safetensors")
    deltas = {}
    for key in st.names:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        t = st.read({"a": key, "b": key.replace("lora_A", "lora_B")})
        a, b = t["a"].astype(np.float64), t["b"].astype(np.float64)
        r = a.shape[0]
        alpha = cfg["lora_alpha"]
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if module.endswith(pattern):
                alpha = value
        scale = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
        delta = scale * (b @ a)
        deltas[f"{module}.weight"] = delta.T if cfg.get("fan_in_fan_out") else delta
    return deltas


def _v1_deltas(path: Path) -> dict[str, np.ndarray]:
    ad = asymlora.read_adapter(path)
    return {
        f"{m}.weight": ad.config.scale(m)
        * (ad.lora_B(m).astype(np.float64) @ ad.lora_A(m).astype(np.float64))
        for m in ad.config.modules
    }


def _assert_reference(
    base: Path, out: Path, terms: list[tuple[dict[str, np.ndarray], float]]
) -> int:
    """Every tensor of ``out`` equals ``round(W + sum w * delta)`` (untouched ones bit for
    bit); returns the number of merged values checked."""
    b, o = _read_dir(base), _read_dir(out)
    assert sorted(b) == sorted(o)
    checked = 0
    for name, w in b.items():
        got = o[name]
        assert got.dtype == w.dtype and got.shape == w.shape, name
        touched = [(d[name], weight) for d, weight in terms if name in d]
        if not touched:
            assert got.tobytes() == w.tobytes(), f"{name} must be bit-identical"
            continue
        exact = w.astype(np.float64) + sum(weight * d for d, weight in touched)
        want = _round_once(exact, w.dtype)
        differ = np.count_nonzero(want.view(np.uint8) != got.view(np.uint8))
        assert differ == 0, f"{name}: {differ} bytes differ from the float64 reference"
        checked += want.size
    return checked


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def base_dir(work: Path) -> Path:
    """A sharded bf16 Llama checkpoint written by transformers."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).to(torch.bfloat16)
    path = work / "base"
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def _peft_adapter(path: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_llama_config())
    config = peft.LoraConfig(target_modules=TARGETS, **lora)
    model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give it trained-like values
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def peft_dir(work: Path) -> Path:
    return _peft_adapter(
        work / "peft",
        1,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"o_proj": 4},
    )


@pytest.fixture(scope="module")
def seeded_adapter(work: Path, base_dir: Path) -> Path:
    """A seed-plus-B adapter (A regenerated) on the same modules, B in bf16."""
    shapes = {}
    for name, t in _read_dir(base_dir).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            shapes[module] = t.shape
    modules = {
        m: ModuleConfig(d_in=s[1], d_out=s[0], stream=i) for i, (m, s) in enumerate(shapes.items())
    }
    cfg = AdapterConfig(rank=4, alpha=8.0, seed=2024, modules=modules, a_dtype="bfloat16")
    rng = np.random.default_rng(5)
    tensors = {
        f"{m}.lora_B": (rng.standard_normal((s[0], 4)) * 0.05).astype(BF16)
        for m, s in shapes.items()
    }
    path = work / "seeded.safetensors"
    asymlora.write_adapter(path, cfg, tensors)
    return path


@pytest.fixture(scope="module")
def merged_peft(work: Path, base_dir: Path, peft_dir: Path) -> Path:
    out = work / "merged-peft"
    report = asymlora.merge_files(base_dir, peft_dir, out, threads=2)
    assert report.merged == 14 and report.modules == 14
    return out


# --------------------------------------------------------------------------- results


def test_peft_dir_matches_the_float64_reference(base_dir, peft_dir, merged_peft):
    n = _assert_reference(base_dir, merged_peft, [(_peft_deltas(peft_dir), 1.0)])
    assert n > 80_000


def test_output_mirrors_the_sharded_input(base_dir, merged_peft):
    names = sorted(p.name for p in base_dir.iterdir())
    assert sorted(p.name for p in merged_peft.iterdir()) == names
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (base_dir / name).exists():
            assert (merged_peft / name).read_bytes() == (base_dir / name).read_bytes(), name
    for shard in base_dir.glob("*.safetensors"):
        ours = SafetensorsFile(merged_peft / shard.name)
        theirs = SafetensorsFile(shard)
        assert ours.names == theirs.names
        assert ours.metadata == theirs.metadata
        assert ours.entries == theirs.entries


def test_agrees_with_peft_merge_and_unload(base_dir, peft_dir, merged_peft):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(model, peft_dir).merge_and_unload()
    theirs = {k: v.view(torch.uint16).numpy().view(BF16) for k, v in model.state_dict().items()}
    ours = _read_dir(merged_peft)
    beyond = 0
    for name, t in theirs.items():
        d = _ulps(ours[name], t)
        beyond += int(np.count_nonzero(d > 1))
    # PEFT rounds the update to bf16 before adding it: where the sum nearly cancels it
    # can be far off in ulps; everywhere else it agrees within one ulp.
    total = sum(t.size for t in theirs.values())
    assert beyond <= total * 1e-4, f"{beyond} of {total} values more than one ulp apart"


def test_seeded_adapter_and_weighted_sum(work, base_dir, peft_dir, seeded_adapter):
    out = work / "weighted"
    report = asymlora.merge_files(
        base_dir, [peft_dir, seeded_adapter], out, weights=[0.5, -1.5], threads=1
    )
    assert report.modules == 28 and report.merged == 14
    _assert_reference(
        base_dir, out, [(_peft_deltas(peft_dir), 0.5), (_v1_deltas(seeded_adapter), -1.5)]
    )
    # unmerge takes the same sum away again, rounding once more
    back = work / "unmerged"
    asymlora.unmerge_files(out, [peft_dir, seeded_adapter], back, weights=[0.5, -1.5])
    _assert_reference(
        out, back, [(_peft_deltas(peft_dir), -0.5), (_v1_deltas(seeded_adapter), 1.5)]
    )
    # ... so the base comes back up to one rounding of the merged value
    b, m, u = _read_dir(base_dir), _read_dir(out), _read_dir(back)
    for k in b:
        bk, mk, uk = (x[k].astype(np.float64) for x in (b, m, u))
        assert np.all(np.abs(uk - bk) <= (np.abs(bk) + np.abs(mk)) * 2.0**-7), k


def test_imported_peft_adapter_gives_the_same_bits(work, base_dir, peft_dir, merged_peft):
    v1 = asymlora.import_peft(peft_dir, work / "imported.safetensors")
    out = work / "merged-imported"
    asymlora.merge_files(base_dir, v1, out)
    for shard in base_dir.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == (merged_peft / shard.name).read_bytes()


def test_gpt2_conv1d_fan_in_fan_out(work):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64)
    torch.manual_seed(3)
    base = work / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(base)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(work / "gpt2-lora")
    out = work / "gpt2-merged"
    asymlora.merge_files(base, work / "gpt2-lora", out)
    _assert_reference(base, out, [(_peft_deltas(work / "gpt2-lora"), 1.0)])
    merged = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(base), work / "gpt2-lora"
    ).merge_and_unload()
    ours = _read_dir(out)
    for name, t in merged.state_dict().items():
        if name in ours:
            np.testing.assert_allclose(ours[name], t.numpy(), rtol=1e-6, atol=1e-7)


def test_dtype_conversion_and_same_bits_for_any_thread_count(work, base_dir, peft_dir):
    outs = []
    for threads in (1, 2):
        out = work / f"f32-{threads}"
        report = asymlora.merge_files(base_dir, peft_dir, out, dtype=np.float32, threads=threads)
        assert report.converted > 0
        outs.append(out)
    for shard in base_dir.glob("*.safetensors"):
        assert (outs[0] / shard.name).read_bytes() == (outs[1] / shard.name).read_bytes()
    ours = _read_dir(outs[0])
    assert all(t.dtype == np.float32 for t in ours.values())
    config = json.loads((outs[0] / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    # float32 output: computed in float64, rounded once
    b = _read_dir(base_dir)
    for name, delta in _peft_deltas(peft_dir).items():
        want = (b[name].astype(np.float64) + delta).astype(np.float32)
        assert np.array_equal(ours[name], want), name
    index = json.loads((outs[0] / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ours.values())


def test_progress_callback_and_report(work, base_dir, seeded_adapter):
    seen: list[asymlora.MergeProgress] = []
    report = asymlora.merge_files(base_dir, seeded_adapter, work / "progress", progress=seen.append)
    assert seen and seen[-1].bytes_done == seen[-1].bytes_total == report.bytes
    assert seen[-1].modules_done == seen[-1].modules_total == 14
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(seen, seen[1:]))
    assert report.files[-1] == "model.safetensors.index.json"
    assert "config.json" in report.copied_files
    assert report.merged_values > 0 and 0 <= report.recomputed < report.merged_values


def test_prefix_map(work, peft_dir):
    # the bare LlamaModel's checkpoint: no "model." prefix
    torch.manual_seed(0)
    bare = work / "bare"
    transformers.LlamaForCausalLM(_llama_config()).to(torch.bfloat16).model.save_pretrained(bare)
    with pytest.raises(asymlora.AdapterMismatchError) as info:
        asymlora.merge_files(bare, peft_dir, work / "bare-out")
    message = str(info.value)
    assert "14 problem(s)" in message and "--prefix-map 'model.='" in message
    assert not (work / "bare-out").exists()
    asymlora.merge_files(bare, peft_dir, work / "bare-out", prefix_map={"model.": ""})
    deltas = {k.removeprefix("model."): v for k, v in _peft_deltas(peft_dir).items()}
    _assert_reference(bare, work / "bare-out", [(deltas, 1.0)])


# --------------------------------------------------------------------------- refusals


def _nothing_written(parent: Path, before: set[str], out: Path) -> None:
    assert not out.exists()
    assert set(os.listdir(parent)) == before


def test_refusals(work, base_dir, peft_dir):
    out = work / "refused"
    before = set(os.listdir(work))
    dora = _peft_adapter(work / "dora", 2, r=4, use_dora=True)
    pickle_only = work / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_bytes(
        (peft_dir / "adapter_config.json").read_bytes()
    )
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    before |= {"dora", "pickle"}
    cases = [
        (dict(adapters=dora), asymlora.AdapterFormatError, "DoRA"),
        (dict(adapters=pickle_only), asymlora.AdapterFormatError, "pickle"),
        (dict(adapters=[peft_dir, peft_dir], weights=[1.0]), ValueError, "one weight per adapter"),
        (dict(adapters=peft_dir, weights=[float("nan")]), ValueError, "finite"),
        # A non-numeric weight names the argument and the position (not just float()'s message).
        (dict(adapters=peft_dir, weights=["half"]), ValueError, r"`weights`: weights\[0\].*'half'"),
        (dict(adapters=peft_dir, weights=[None]), ValueError, r"`weights`: weights\[0\]"),
        (dict(adapters=peft_dir, weights=[True]), ValueError, r"`weights`: weights\[0\]"),
        (dict(adapters=peft_dir, dtype="int8"), ValueError, "unknown dtype"),
        (dict(adapters=peft_dir, threads=0), ValueError, "threads"),
        (dict(adapters=work / "missing"), FileNotFoundError, "missing"),
    ]
    for kwargs, error, needle in cases:
        adapters = kwargs.pop("adapters")
        with pytest.raises(error, match=needle):
            asymlora.merge_files(base_dir, adapters, out, **kwargs)
        _nothing_written(work, before, out)
    with pytest.raises(FileExistsError, match="never writes into the base"):
        asymlora.merge_files(base_dir, peft_dir, base_dir / "inside")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        asymlora.merge_files(base_dir, peft_dir, out)
    with pytest.raises(FileExistsError, match="not a model directory"):
        asymlora.merge_files(base_dir, peft_dir, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_nonfinite_and_a_failing_callback(work, base_dir, seeded_adapter):
    ad = asymlora.read_adapter(seeded_adapter)
    tensors = {k: np.array(v) for k, v in ad.tensors.items()}
    first = next(iter(tensors))
    tensors[first] = tensors[first].astype(np.float32)
    tensors[first][0, 0] = np.nan
    bad = work / "nan.safetensors"
    asymlora.write_adapter(bad, ad.config, tensors)
    before = set(os.listdir(work))
    out = work / "nan-out"
    with pytest.raises(ValueError, match="NaN or infinite"):
        asymlora.merge_files(base_dir, bad, out)
    _nothing_written(work, before, out)
    with pytest.warns(UserWarning, match="became infinite or NaN"):
        report = asymlora.merge_files(base_dir, bad, out, allow_nonfinite=True)
    assert report.nonfinite > 0
    assert any("infinite or NaN" in w for w in report.warnings)

    def stop(p: asymlora.MergeProgress) -> None:
        if p.bytes_done > 0:
            raise KeyboardInterrupt

    before = set(os.listdir(work))
    with pytest.raises(KeyboardInterrupt):
        asymlora.merge_files(base_dir, seeded_adapter, work / "stopped", progress=stop)
    _nothing_written(work, before, work / "stopped")


# --------------------------------------------------------------------------- command line


def test_console_script(cli_path, work, base_dir, peft_dir, merged_peft):
    out = work / "cli"
    proc = subprocess.run(
        [cli_path, "merge", base_dir, f"{peft_dir}:1", "-o", out, "--threads", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 14 weight(s) (14 module(s) from 1 adapter(s))" in proc.stderr
    for shard in base_dir.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == (merged_peft / shard.name).read_bytes()
    proc = subprocess.run(
        [cli_path, "merge", base_dir, peft_dir, "-o", out], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("asymlora: error: ") and "--force" in proc.stderr
    proc = subprocess.run(
        [cli_path, "unmerge", out, peft_dir, "-o", work / "cli-un", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_no_torch_needed(cli_path, work, base_dir, seeded_adapter):
    # torch made unimportable: merge_files and the command line still work
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import asymlora
        from asymlora.cli import main
        asymlora.merge_files({str(base_dir)!r}, {str(seeded_adapter)!r}, {str(work / "nt1")!r})
        code = main(["merge", {str(base_dir)!r}, {str(seeded_adapter)!r}, "-o",
                     {str(work / "nt2")!r}, "-q"])
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        sys.exit(code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (work / "nt1").is_dir() and (work / "nt2").is_dir()
    proc = subprocess.run([cli_path, "merge", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ADAPTER[:WEIGHT]" in proc.stdout


def test_readme_merge_example_runs(tmp_path, monkeypatch, base_dir, peft_dir, seeded_adapter):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "merge_files(" in b)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base_dir, tmp_path / "Llama-3.2-1B")
    shutil.copy(seeded_adapter, tmp_path / "adapter.safetensors")
    shutil.copytree(peft_dir, tmp_path / "peft_lora_dir")
    exec(compile(block, str(README), "exec"), {})
    _assert_reference(
        base_dir,
        tmp_path / "Llama-3.2-1B-merged",
        [(_v1_deltas(seeded_adapter), 1.0), (_peft_deltas(peft_dir), 0.5)],
    )
