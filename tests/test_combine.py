"""Exact adapter algebra: ``asymlora.combine_adapters`` and ``asymlora combine``.

Adapters with one shared ``A`` combine by summing ``B``; others by concatenation. The
combined adapter's update (``Adapter.delta``, float64) must equal ``sum_i w_i delta_i``
up to the one rounding of ``B``, and merging it into a base with ``merge_files`` must
match merging the list: within one ulp for bfloat16 bases (and for float32 bases with a
float64 ``B``), within one ulp plus the rounding of ``B`` for float32 bases. The
fractions of bit-equal values are printed (``pytest -s``). No torch anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import asymlora
from asymlora import AdapterConfig, ModuleConfig
from asymlora._safetensors import SafetensorsFile, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
#: (name, d_out, d_in) of a tiny model's adapted weights
MODULES = [
    ("layers.0.attn.q_proj", 48, 32),
    ("layers.0.attn.v_proj", 16, 32),
    ("layers.0.mlp.up_proj", 80, 32),
    ("layers.0.mlp.down_proj", 32, 80),
]


def _adapter(
    path: Path,
    *,
    seed: int,
    values: int,
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    b_dtype: np.dtype = F32,
    b_scale: float = 0.1,
    skip: tuple[str, ...] = (),
    stored_down: bool = False,
    full: bool = False,
) -> Path:
    """An adapter on MODULES; ``up_proj`` has rank 6 and alpha 3."""
    rng = np.random.default_rng(values)
    modules, tensors = {}, {}
    for stream, (name, d_out, d_in) in enumerate(MODULES):
        if any(name.endswith(s) for s in skip):
            continue
        up = name.endswith("up_proj")
        stored = stored_down and name.endswith("down_proj")
        modules[name] = ModuleConfig(
            d_in=d_in,
            d_out=d_out,
            stream=stream,
            a_stored=stored,
            rank=6 if up else None,
            alpha=3.0 if up else None,
        )
        r = 6 if up else rank
        if stored:
            tensors[f"{name}.lora_A"] = rng.standard_normal((r, d_in)).astype(np.float32)
        b = b_scale * rng.standard_normal((d_out, r))
        tensors[f"{name}.lora_B"] = b.astype(b_dtype)
    full_tensors: tuple[str, ...] = ()
    if full:
        tensors["score.weight"] = rng.standard_normal((2, 32)).astype(np.float32)
        full_tensors = ("score.weight",)
    config = AdapterConfig(
        rank=rank,
        alpha=alpha,
        seed=seed,
        scaling="alpha/sqrt(r)" if rslora else "alpha/r",
        modules=modules,
        full_tensors=full_tensors,
    )
    asymlora.write_adapter(path, config, tensors)
    return path


def _magnitude(ad: asymlora.Adapter, module: str) -> np.ndarray:
    """``|s| |B| @ |A|``: what rounding ``B`` scales with."""
    a = np.abs(ad.lora_A(module).astype(np.float64))
    b = np.abs(ad.lora_B(module).astype(np.float64))
    return abs(ad.config.scale(module)) * (b @ a)


def _check_sum(combined: Path, terms: list[tuple[Path, float]], unit: float = 2.0**-24) -> float:
    """The combined delta equals ``sum w_i delta_i`` within ``unit`` (B's rounding) of
    its magnitude; returns the worst error as a fraction of that bound."""
    out = asymlora.read_adapter(combined)
    inputs = [(asymlora.read_adapter(p), w) for p, w in terms]
    names = sorted({m for ad, _ in inputs for m in ad.modules})
    assert sorted(out.modules) == names
    worst = 0.0
    for m in names:
        want = sum(w * ad.delta(m) for ad, w in inputs if m in ad.config.modules)
        want_mag = sum(abs(w) * _magnitude(ad, m) for ad, w in inputs if m in ad.config.modules)
        got = out.delta(m)
        bound = unit * np.maximum(_magnitude(out, m), want_mag) + 1e-12 * want_mag + 1e-300
        err = np.abs(got - want)
        assert np.all(err <= bound), f"{m}: max error {err.max()} > bound"
        worst = max(worst, float((err / bound).max()))
    return worst


# --------------------------------------------------------------------------- algebra


def test_shared_a_sums_b(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    b = _adapter(tmp_path / "b.safetensors", seed=7, values=2, alpha=16.0)
    c = _adapter(tmp_path / "c.safetensors", seed=7, values=3, alpha=3.0, rslora=True)
    terms = [(a, 1.0), (b, 0.5), (c, -2.0)]
    report = asymlora.combine_adapters(terms, tmp_path / "out.safetensors")
    assert isinstance(report, asymlora.CombineReport)
    assert report.out == tmp_path / "out.safetensors"
    assert (report.adapters, report.modules, report.shared, report.concatenated) == (3, 4, 4, 0)
    assert report.stored_a == 0 and report.full_tensors == 0 and report.warnings == []
    assert "CombineReport(" in repr(report)

    out = asymlora.read_adapter(report.out)
    assert out.config.seed == 7 and out.config.rank == 4 and out.config.alpha == 8.0
    assert not out.config.rslora
    assert all(not m.a_stored for m in out.config.modules.values())
    assert out.lora_B("layers.0.attn.q_proj").dtype == np.float32
    assert out.config.module_rank("layers.0.mlp.up_proj") == 6
    # Still seed-plus-B: the file is no larger than one input.
    assert out.file_size == a.stat().st_size
    worst = _check_sum(report.out, terms)
    print(f"\nshared A: worst delta error {worst:.3f} of the float32-rounding bound")


def test_concatenation_when_a_differs(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    b = _adapter(tmp_path / "b.safetensors", seed=8, values=2, rank=3, rslora=True)
    c = _adapter(tmp_path / "c.safetensors", seed=9, values=3, stored_down=True)
    terms = [(a, 0.75), (b, 1.5), (c, 1.0)]
    report = asymlora.combine_adapters(terms, tmp_path / "out.safetensors")
    assert (report.shared, report.concatenated, report.stored_a) == (0, 4, 4)
    out = asymlora.read_adapter(report.out)
    ads = [asymlora.read_adapter(p) for p, _ in terms]
    for m in out.modules:
        assert out.config.modules[m].a_stored
        assert out.config.module_rank(m) == sum(ad.config.module_rank(m) for ad in ads)
        assert out.config.scale(m) == 1.0
        np.testing.assert_array_equal(out.lora_A(m), np.vstack([ad.lora_A(m) for ad in ads]))
    worst = _check_sum(report.out, terms)
    print(f"\nconcatenation: worst delta error {worst:.3f} of the float32-rounding bound")


def test_mixed_groups_partial_modules_and_full_tensors(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1, full=True, skip=("v_proj",))
    b = _adapter(tmp_path / "b.safetensors", seed=7, values=2)
    c = _adapter(tmp_path / "c.safetensors", seed=9, values=3, skip=("q_proj",))
    terms = [(a, 1.0), (b, 0.25), (c, 0.5)]
    report = asymlora.combine_adapters(terms, tmp_path / "out.safetensors")
    # q: a, b share A; v: b, c differ; up, down: a, b share, c differs.
    assert (report.modules, report.shared, report.concatenated, report.full_tensors) == (4, 1, 3, 1)
    out = asymlora.read_adapter(report.out)
    assert out.config.full_tensors == ("score.weight",)
    np.testing.assert_array_equal(
        out.tensors["score.weight"], asymlora.read_adapter(a).tensors["score.weight"]
    )
    assert out.config.module_rank("layers.0.attn.v_proj") == 8
    assert out.config.module_rank("layers.0.mlp.up_proj") == 12
    _check_sum(report.out, terms)
    # A module of one adapter only gets w * s * B (here with A from another seed: stored).
    only = asymlora.combine_adapters([a, (c, 0.5)], tmp_path / "only.safetensors")
    assert only.modules == 4
    _check_sum(only.out, [(a, 1.0), (c, 0.5)])


def test_b_dtype_rules(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1, b_dtype=BF16)
    b = _adapter(tmp_path / "b.safetensors", seed=7, values=2, b_dtype=BF16)
    h = _adapter(tmp_path / "h.safetensors", seed=7, values=3, b_dtype=np.dtype(np.float16))
    q = "layers.0.attn.q_proj"
    r = asymlora.combine_adapters([a, b], tmp_path / "bf.safetensors")
    assert asymlora.read_adapter(r.out).lora_B(q).dtype == BF16
    _check_sum(r.out, [(a, 1.0), (b, 1.0)], unit=2.0**-8)
    r = asymlora.combine_adapters([a, h], tmp_path / "mixed.safetensors")
    assert asymlora.read_adapter(r.out).lora_B(q).dtype == np.float32
    r = asymlora.combine_adapters([a, h], tmp_path / "f64.safetensors", b_dtype=np.float64)
    assert asymlora.read_adapter(r.out).lora_B(q).dtype == np.float64
    _check_sum(r.out, [(a, 1.0), (h, 1.0)], unit=2.0**-52)
    with pytest.raises(ValueError, match="b_dtype"):
        asymlora.combine_adapters([a], tmp_path / "x.safetensors", b_dtype="int8")


def test_one_adapter_with_weight_one_is_itself(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1, full=True)
    asymlora.combine_adapters(a, tmp_path / "same.safetensors")
    assert (tmp_path / "same.safetensors").read_bytes() == a.read_bytes()


# --------------------------------------------------------------------------- merge equivalence


def _base(path: Path, dtype: np.dtype) -> Path:
    rng = np.random.default_rng(99)
    tensors = {
        f"{name}.weight": rng.uniform(-0.05, 0.05, (d_out, d_in)).astype(dtype)
        for name, d_out, d_in in MODULES
    }
    tensors["score.weight"] = rng.standard_normal((2, 32)).astype(dtype)
    write_safetensors(path, tensors, {"format": "pt"})
    return path


def _ulp_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between two float32 or bfloat16 arrays."""
    uint, sign = (np.uint32, 1 << 31) if x.dtype == np.float32 else (np.uint16, 1 << 15)

    def ordered(v: np.ndarray) -> np.ndarray:
        bits = v.view(uint).astype(np.int64)
        return np.where(bits & sign, -(bits & (sign - 1)), bits)

    return np.abs(ordered(x) - ordered(y))


def _spacing(x: np.ndarray) -> np.ndarray:
    """One ulp of each value (float32 or bfloat16), in float64."""
    a = np.abs(x)
    return (
        np.nextafter(a, np.inf).astype(np.float64) - a.astype(np.float64)
        if x.dtype == np.float32
        else ((a.view(np.uint16) + 1).view(BF16).astype(np.float64) - a.astype(np.float64))
    )


@pytest.mark.parametrize("b_scale", [0.1, 0.002])
@pytest.mark.parametrize("case", ["shared", "concatenated"])
def test_merging_the_combined_adapter_matches_merging_the_list(tmp_path, case, b_scale):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1, b_scale=b_scale)
    if case == "shared":
        b = _adapter(tmp_path / "b.safetensors", seed=7, values=2, alpha=16.0, b_scale=b_scale)
        terms = [(a, 0.6), (b, 0.4)]
    else:
        b = _adapter(
            tmp_path / "b.safetensors",
            seed=8,
            values=2,
            rank=3,
            stored_down=True,
            b_scale=b_scale,
        )
        terms = [(a, 1.0), (b, -0.5)]
    paths, weights = [p for p, _ in terms], [w for _, w in terms]
    lines = []
    for b_dtype, unit in (("float32", 2.0**-24), ("float64", 2.0**-50)):
        combined = tmp_path / f"combined-{b_dtype}.safetensors"
        asymlora.combine_adapters(terms, combined, b_dtype=b_dtype)
        ad = asymlora.read_adapter(combined)
        for dtype in (np.dtype(np.float32), BF16):
            base = _base(tmp_path / f"base-{dtype.name}.safetensors", dtype)
            listed = tmp_path / f"list-{b_dtype}-{dtype.name}.safetensors"
            merged = tmp_path / f"combined-{b_dtype}-{dtype.name}.safetensors"
            asymlora.merge_files(base, paths, listed, weights=weights)
            asymlora.merge_files(base, combined, merged)
            fl, fc = SafetensorsFile(listed), SafetensorsFile(merged)
            equal = total = worst = beyond = 0
            for name, _, _ in MODULES:
                key = f"{name}.weight"
                x = fl.read({"w": key})["w"]
                y = fc.read({"w": key})["w"]
                d = _ulp_distance(x, y)
                equal += int((d == 0).sum())
                beyond += int((d > 1).sum())
                total += d.size
                worst = max(worst, int(d.max()))
                # Always: one ulp plus the rounding of the combined B.
                bound = np.maximum(_spacing(x), _spacing(y)) + 1.01 * unit * _magnitude(ad, name)
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                assert np.all(diff <= bound), key
            assert fl.read({"s": "score.weight"})["s"].tobytes() == (
                fc.read({"s": "score.weight"})["s"].tobytes()
            )
            lines.append(
                f"B scale {b_scale}, {case}, {b_dtype} B, {dtype.name} base: "
                f"{equal}/{total} = {equal / total:.4f} bit-equal, max {worst} ulp, "
                f"{beyond} beyond 1 ulp"
            )
            if dtype == BF16 or b_dtype == "float64":
                assert worst <= 1, lines[-1]
    print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------- PEFT


def _peft_dir(path: Path, rng: np.random.Generator) -> Path:
    path.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name, d_out, d_in in MODULES[:2]:
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((4, d_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((d_out, 4)).astype(np.float32)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    return path


def test_peft_directories(tmp_path):
    peft_dir = _peft_dir(tmp_path / "peft", np.random.default_rng(3))
    twice = asymlora.combine_adapters(
        [(peft_dir, 0.5), (peft_dir, 0.5)], tmp_path / "t.safetensors"
    )
    assert (twice.shared, twice.concatenated, twice.stored_a) == (2, 0, 2)
    imported = tmp_path / "imported.safetensors"
    asymlora.import_peft(peft_dir, imported)
    ref = asymlora.read_adapter(imported)
    out = asymlora.read_adapter(twice.out)
    for m in ref.modules:
        np.testing.assert_array_equal(out.lora_B(m), ref.lora_B(m))  # 0.5 B + 0.5 B = B
        np.testing.assert_array_equal(out.lora_A(m), ref.lora_A(m))
    v1 = _adapter(tmp_path / "v1.safetensors", seed=7, values=1)
    mixed = asymlora.combine_adapters([v1, (peft_dir, 2.0)], tmp_path / "m.safetensors")
    assert (mixed.shared, mixed.concatenated) == (2, 2)
    _check_sum(mixed.out, [(v1, 1.0), (imported, 2.0)])


# --------------------------------------------------------------------------- refusals


def test_refusals(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    full = _adapter(tmp_path / "full.safetensors", seed=7, values=2, full=True)
    narrow = tmp_path / "narrow.safetensors"
    config = AdapterConfig(
        rank=4, alpha=8, seed=7, modules={"layers.0.attn.q_proj": ModuleConfig(24, 48, 0)}
    )
    asymlora.write_adapter(
        narrow, config, {"layers.0.attn.q_proj.lora_B": np.zeros((48, 4), np.float32)}
    )
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())

    for bad, match in (
        ([], "at least one adapter"),
        ([(a, float("nan"))], "finite number"),
        ([(a, "0.5")], "must be a number"),
        ([(a, True)], "must be a number"),
        ([(a, 1.0, 2.0)], "neither a path nor"),
    ):
        with pytest.raises(ValueError, match=match):
            asymlora.combine_adapters(bad, out)  # type: ignore[arg-type]
    with pytest.raises(asymlora.AdapterMismatchError, match=r"40|48 x 32.*48 x 24"):
        asymlora.combine_adapters([a, narrow], out)
    with pytest.raises(asymlora.AdapterMismatchError, match="cannot be weighted"):
        asymlora.combine_adapters([(full, 0.5)], out)
    with pytest.raises(asymlora.AdapterMismatchError, match="cannot be summed"):
        asymlora.combine_adapters([full, full], out)
    with pytest.raises(FileNotFoundError):
        asymlora.combine_adapters([tmp_path / "missing.safetensors"], out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asymlora.combine_adapters([a], tmp_path / "no-such-dir" / "out.safetensors")
    with pytest.raises(FileExistsError, match="is the input adapter"):
        asymlora.combine_adapters([a], a, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"

    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        asymlora.combine_adapters([a], out)
    asymlora.combine_adapters([(a, np.float32(1.0))], out, force=True)  # numpy weights too
    assert out.read_bytes() == a.read_bytes()


def _with_config_field(path: Path, module: str | None, field: str, value: object) -> Path:
    """An adapter on MODULES whose config has ``field`` (of ``module``) set to ``value``."""
    valid = asymlora.read_adapter(_adapter(tmp := path.with_suffix(".tmp"), seed=7, values=1))
    config = json.loads(valid.config.to_json())
    (config["modules"][module] if module else config)[field] = value
    tensors = dict(valid.tensors)
    tmp.unlink()
    metadata = {"format": "asymlora", "format_version": "1", "asymlora_config": json.dumps(config)}
    write_safetensors(path, tensors, metadata)
    return path


def test_wrong_typed_config_fields_are_refused_by_the_rust_reader(tmp_path):
    # A string "false" where a boolean belongs (and the like) is refused by the one
    # reader in the Rust core, for asymlora files and PEFT directories alike, naming
    # the file and the field; Python does not re-validate.
    q = MODULES[0][0]
    for module, field, value in (
        (q, "a_stored", "false"),
        (q, "d_in", "32"),
        (None, "rank", "4"),
        (None, "alpha", "8"),
        (None, "scaling", False),
    ):
        bad = _with_config_field(tmp_path / f"{field}.safetensors", module, field, value)
        with pytest.raises(asymlora.AdapterFormatError, match=rf"{bad.name}.*field .*{field}"):
            asymlora.read_adapter(bad)
        with pytest.raises(asymlora.AdapterFormatError, match=rf"{bad.name}.*field .*{field}"):
            asymlora.combine_adapters([bad], tmp_path / "out.safetensors")
    for field, value, message in (
        ("use_dora", "false", "must be true or false"),
        ("fan_in_fan_out", "false", "must be true or false"),
        ("use_rslora", 0, "must be true or false"),
        ("r", "4", "must be a positive integer"),
        ("lora_alpha", "8", "must be a finite number"),
    ):
        peft_dir = _peft_dir(tmp_path / f"peft-{field}", np.random.default_rng(1))
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        (peft_dir / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        refused = rf"adapter_config.json: {field}: {message}"
        with pytest.raises(asymlora.AdapterFormatError, match=refused):
            asymlora.combine_adapters([peft_dir], tmp_path / "out.safetensors")
        with pytest.raises(asymlora.AdapterFormatError, match=refused):
            asymlora.import_peft(peft_dir, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_no_torch_needed(tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    b = _adapter(tmp_path / "b.safetensors", seed=8, values=2)
    code = (
        "import sys, asymlora\n"
        f"r = asymlora.combine_adapters([{str(a)!r}, ({str(b)!r}, 0.5)], "
        f"{str(tmp_path / 'c.safetensors')!r})\n"
        "assert r.concatenated == 4, r\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- command line


def _run(cli_path: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(cli_path), "combine", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_combines(cli_path, tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    b = _adapter(tmp_path / "b.safetensors", seed=7, values=2)
    out = tmp_path / "out.safetensors"
    proc = _run(cli_path, a, f"{b}:0.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "combined 2 adapter(s)" in proc.stderr and "4 with a shared A" in proc.stderr
    python = tmp_path / "python.safetensors"
    asymlora.combine_adapters([a, (b, 0.5)], python)
    assert out.read_bytes() == python.read_bytes(), "the CLI and Python write the same file"
    proc = _run(cli_path, a, "-o", tmp_path / "f64.safetensors", "--b-dtype", "float64", "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_cli_errors_are_one_line(cli_path, tmp_path):
    a = _adapter(tmp_path / "a.safetensors", seed=7, values=1)
    narrow = tmp_path / "narrow.safetensors"
    config = AdapterConfig(
        rank=4, alpha=8, seed=7, modules={"layers.0.attn.q_proj": ModuleConfig(24, 48, 0)}
    )
    asymlora.write_adapter(
        narrow, config, {"layers.0.attn.q_proj.lora_B": np.zeros((48, 4), np.float32)}
    )
    out = tmp_path / "out.safetensors"
    for args, message in (
        ([], "give at least one adapter"),
        ([f"{a}:abc"], "is not a number"),
        ([f"{a}:inf"], "must be a finite number"),
        ([a, narrow], "module layers.0.attn.q_proj is 48 x 32 (d_out x d_in)"),
        ([tmp_path / "missing.safetensors"], "does not exist"),
        ([a, "--b-dtype", "int8"], "unknown dtype"),
    ):
        proc = _run(cli_path, *args, "-o", out)
        assert proc.returncode == 1, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("asymlora: error: ") and message in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
    assert not out.exists()
    proc = _run(cli_path, a)  # no -o: a usage error
    assert proc.returncode == 2
