"""The wheel a user pip-installs, used as a user would use it.

``scripts/build-wheel.sh`` builds the abi3 manylinux2014 wheel (and the sdist); the
wheel is installed into a fresh virtualenv whose PATH has no cargo or rustc, and
everything below runs from that install: the version, ``asymlora inspect`` on an
adapter the installed package wrote, the regenerated ``A`` (bit-equal to this
process's own asymlora) and ``asymlora merge`` against a float64 reference.

One build serves the whole module (a release build: minutes the first time, seconds
when ``target/wheel`` is warm). Where something it needs is missing (Linux, cargo,
objdump), it skips, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import asymlora

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"

SEED = 4242
RANK = 8
ALPHA = 16.0
D_IN, D_OUT, STREAM = 64, 48, 3


def _require(ok: object, why: str) -> None:
    """Skips when ``ok`` is false, or fails under CI=true."""
    if not ok:
        if IN_CI:
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


def _workspace_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    section = re.search(r"^\[workspace\.package\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "no [workspace.package] in Cargo.toml"
    version = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
    assert version, "no version in [workspace.package]"
    return version.group(1)


def _run(args: list[object], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def _tail(proc: subprocess.CompletedProcess, n: int = 60) -> str:
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The wheel and sdist built by scripts/build-wheel.sh, and its output."""
    _require(sys.platform.startswith("linux"), "manylinux wheels are built on Linux only")
    _require(shutil.which("cargo"), "cargo is not on PATH")
    _require(shutil.which("bash"), "bash is not on PATH")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)
    # The test environment has maturin and (test extra) ziglang: build with them
    # rather than downloading both again; otherwise the script makes its own venv.
    here = Path(sys.prefix)
    if (
        sys.prefix != sys.base_prefix
        and (here / "bin" / "maturin").exists()
        and importlib.util.find_spec("ziglang") is not None
    ):
        env["VENV"] = str(here)
    else:
        env.pop("VENV", None)
    proc = _run(["bash", ROOT / "scripts" / "build-wheel.sh", out], timeout=2400, env=env)
    assert proc.returncode == 0, f"build-wheel.sh failed:\n{_tail(proc)}"
    wheels = sorted(out.glob("*.whl"))
    sdists = sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    log = out.parent / "build-wheel.log"
    log.write_text(proc.stdout + proc.stderr)
    return {"wheel": wheels[0], "sdist": sdists[0], "log": log}


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory) -> dict:
    """A fresh virtualenv with the wheel installed, and an environment for running
    from it that has no Rust toolchain on its PATH."""
    root = tmp_path_factory.mktemp("venv") / "env"
    proc = _run([sys.executable, "-m", "venv", root], timeout=300)
    assert proc.returncode == 0, _tail(proc)
    bin_dir = root / "bin"
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    for tool in ("cargo", "rustc"):
        assert shutil.which(tool, path=path) is None, f"{tool} is on the install's PATH"
    drop = ("CARGO", "RUSTUP", "RUSTC", "PYTHON", "VIRTUAL_ENV", "MATURIN", "CONDA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = path
    env["VIRTUAL_ENV"] = str(root)
    python = bin_dir / "python"
    # binaries only: nothing is compiled on the way (numpy and ml-dtypes from PyPI)
    proc = _run(
        [python, "-m", "pip", "install", "--quiet", "--only-binary", ":all:", built["wheel"]],
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{_tail(proc)}"
    work = tmp_path_factory.mktemp("work")
    return {"root": root, "python": python, "cli": bin_dir / "asymlora", "env": env, "cwd": work}


def _py(venv: dict, code: str, *args: object, timeout: float = 300) -> str:
    """Runs ``code`` with the installed package (from a folder outside the checkout)."""
    proc = _run(
        [venv["python"], "-c", textwrap.dedent(code), *args],
        timeout=timeout,
        env=venv["env"],
        cwd=venv["cwd"],
    )
    assert proc.returncode == 0, _tail(proc)
    return proc.stdout


def _cli(venv: dict, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([venv["cli"], *args], timeout=timeout, env=venv["env"], cwd=venv["cwd"])


_WRITE_ADAPTER = """
import sys
import numpy as np
import asymlora
from asymlora import AdapterConfig, ModuleConfig

path, seed, rank, alpha, d_in, d_out, stream = sys.argv[1:]
d_in, d_out, rank = int(d_in), int(d_out), int(rank)
config = AdapterConfig(
    rank=rank,
    alpha=float(alpha),
    seed=int(seed),
    modules={"layer": ModuleConfig(d_in=d_in, d_out=d_out, stream=int(stream))},
)
b = (np.random.default_rng(7).standard_normal((d_out, rank)) * 0.1).astype(np.float32)
asymlora.write_adapter(path, config, {"layer.lora_B": b})
"""


@pytest.fixture(scope="module")
def adapter(venv, tmp_path_factory) -> Path:
    """A seed-plus-B adapter written by the installed package."""
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    _py(venv, _WRITE_ADAPTER, path, SEED, RANK, ALPHA, D_IN, D_OUT, STREAM)
    assert path.is_file()
    return path


# --------------------------------------------------------------------------- tests


def test_wheel_is_abi3_manylinux2014(built):
    arch = platform.machine()
    version = _workspace_version()
    name = built["wheel"].name
    assert name == (
        f"asymlora-{version}-cp39-abi3-manylinux2014_{arch}.manylinux_2_17_{arch}.whl"
    ), name
    assert built["sdist"].name == f"asymlora-{version}.tar.gz"
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = whl.namelist()
        wheel_meta = whl.read(f"asymlora-{version}.dist-info/WHEEL").decode()
        metadata = whl.read(f"asymlora-{version}.dist-info/METADATA").decode()
    tags = {line.split(": ", 1)[1] for line in wheel_meta.splitlines() if line.startswith("Tag:")}
    assert tags == {f"cp39-abi3-manylinux2014_{arch}", f"cp39-abi3-manylinux_2_17_{arch}"}
    assert "Root-Is-Purelib: false" in wheel_meta
    assert f"\nVersion: {version}\n" in metadata
    assert "asymlora/_native.abi3.so" in names
    assert "asymlora/__init__.py" in names and "asymlora/cli.py" in names


def test_extension_needs_no_glibc_newer_than_2_17(built, tmp_path):
    _require(shutil.which("objdump"), "objdump (binutils) is not on PATH")
    with zipfile.ZipFile(built["wheel"]) as whl:
        so = Path(whl.extract("asymlora/_native.abi3.so", tmp_path))
    proc = _run(["objdump", "-T", so], timeout=60)
    assert proc.returncode == 0, proc.stderr
    versions = {
        tuple(int(p) for p in v.split("."))
        for v in re.findall(r"GLIBC_([0-9]+(?:\.[0-9]+)*)", proc.stdout)
    }
    assert versions, "no GLIBC symbol versions found"
    assert max(versions) <= (2, 17), sorted(versions)[-3:]


def test_install_has_no_rust_and_runs_from_site_packages(venv):
    assert shutil.which("cargo", path=venv["env"]["PATH"]) is None
    assert shutil.which("rustc", path=venv["env"]["PATH"]) is None
    code = "import asymlora, asymlora._native as n; print(asymlora.__file__); print(n.__file__)"
    out = _py(venv, code)
    package, native = (Path(line).resolve() for line in out.splitlines())
    root = venv["root"].resolve()
    assert package.is_relative_to(root), package
    assert native.is_relative_to(root) and native.name == "_native.abi3.so", native


def test_version_is_the_cargo_workspace_version(venv):
    version = _workspace_version()
    proc = _cli(venv, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["asymlora", version]
    assert _py(venv, "import asymlora; print(asymlora.__version__)").strip() == version
    # and the package this test process imports says the same
    assert asymlora.__version__ == version


def test_inspect_an_adapter_the_installed_package_wrote(venv, adapter):
    proc = _cli(venv, "inspect", adapter)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for expected in (str(adapter), "haar-v1", f"seed {SEED}", "layer", f"{D_OUT} x {D_IN}"):
        assert expected in proc.stdout, (expected, proc.stdout)
    # this process reads the same file
    opened = asymlora.read_adapter(adapter)
    assert opened.modules == ["layer"] and opened.config.seed == SEED


_REGENERATE = """
import json, sys
import asymlora

out = sys.argv[1]
cases = json.loads(sys.argv[2])
with open(out, "wb") as f:
    for r, d_in, seed, stream, dtype in cases:
        a = asymlora.random_orthogonal(r, d_in, seed=seed, stream=stream, dtype=dtype)
        f.write(a.tobytes())
    many = asymlora.random_orthogonal_many([(4, 32), (8, 64)], seed=11, streams=[5, 6])
    for a in many:
        f.write(a.tobytes())
"""


def test_regenerated_a_is_bit_equal_to_this_process(venv, tmp_path):
    cases = [
        (RANK, D_IN, SEED, STREAM, "float32"),
        (16, 384, 0, 0, "float32"),
        (8, 100, 2**64 - 1, 2**40, "float16"),
        (4, 64, 1, 2, "bfloat16"),
    ]
    path = tmp_path / "a.bin"
    _py(venv, _REGENERATE, path, json.dumps(cases))
    want = b"".join(
        asymlora.random_orthogonal(r, d, seed=s, stream=t, dtype=dt).tobytes()
        for r, d, s, t, dt in cases
    ) + b"".join(
        a.tobytes()
        for a in asymlora.random_orthogonal_many([(4, 32), (8, 64)], seed=11, streams=[5, 6])
    )
    got = path.read_bytes()
    assert len(got) == len(want)
    assert got == want, "the installed wheel regenerates different bits"


def test_merge_matches_the_float64_reference(venv, adapter, tmp_path):
    rng = np.random.default_rng(3)
    base = {
        "layer.weight": rng.standard_normal((D_OUT, D_IN)).astype(np.float32),
        "layer.bias": rng.standard_normal(D_OUT).astype(np.float32),
        "head.weight": rng.standard_normal((2, D_OUT)).astype(np.float32),
        "position_ids": np.arange(5, dtype=np.int64),
    }
    base_path = tmp_path / "base.safetensors"
    safetensors.numpy.save_file(base, str(base_path))
    out = tmp_path / "merged.safetensors"
    proc = _cli(venv, "merge", base_path, adapter, "--out", out, "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert "merged 1 weight(s)" in proc.stderr, proc.stderr
    merged = safetensors.numpy.load_file(str(out))
    assert sorted(merged) == sorted(base)
    for name in ("layer.bias", "head.weight", "position_ids"):
        assert merged[name].tobytes() == base[name].tobytes(), name

    ad = asymlora.read_adapter(adapter)
    a = asymlora.random_orthogonal(RANK, D_IN, seed=SEED, stream=STREAM)
    assert a.tobytes() == ad.lora_A("layer").tobytes()
    b = ad.lora_B("layer").astype(np.float64)
    scale = ALPHA / RANK
    want = (base["layer.weight"].astype(np.float64) + scale * (b @ a.astype(np.float64))).astype(
        np.float32
    )
    got = merged["layer.weight"]
    assert got.dtype == np.float32 and got.shape == (D_OUT, D_IN)
    differ = np.count_nonzero(got.view(np.uint32) != want.view(np.uint32))
    assert differ == 0, f"{differ} values differ from the float64 reference rounded to float32"
    assert not np.array_equal(got, base["layer.weight"]), "the merge changed nothing"
