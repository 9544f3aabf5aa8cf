"""Clean deaths: SIGTERM/SIGHUP/SIGINT stop a merge cleanly, SIGKILL leaves at most a
marked temporary that the next merge into the same OUT removes.

The checkpoints are written here with the safetensors library; every output that exists
after a kill must be byte for byte the output of a merge that ran to the end (the merge
is deterministic to the bit), and loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import asymlora
from asymlora import AdapterConfig, ModuleConfig
from asymlora.offline_merge import Interrupted

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc: Linux")

LAYERS, ROWS, COLS, RANK = 6, 768, 1024, 128
MARKER = "asymlora-merge-owner"


def _model_dir(path: Path) -> Path:
    """Two shards, an index and a config: 6 float32 weights of 768 x 1024 (18 MiB); at
    rank 128 a merge takes about 0.5 s, long enough to be interrupted in the middle."""
    path.mkdir()
    rng = np.random.default_rng(7)
    names = [f"layers.{i}.proj.weight" for i in range(LAYERS)]
    shards = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    weight_map = {}
    for shard, members in shards.items():
        tensors = {n: rng.standard_normal((ROWS, COLS)).astype(np.float32) for n in members}
        safetensors.numpy.save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    size = LAYERS * ROWS * COLS * 4
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text('{"torch_dtype": "float32"}\n')
    return path


def _adapter(path: Path) -> Path:
    modules = {
        f"layers.{i}.proj": ModuleConfig(d_in=COLS, d_out=ROWS, stream=i) for i in range(LAYERS)
    }
    config = AdapterConfig(rank=RANK, alpha=16.0, seed=5, modules=modules)
    rng = np.random.default_rng(8)
    tensors = {
        f"layers.{i}.proj.lora_B": rng.standard_normal((ROWS, RANK)).astype(np.float32)
        for i in range(LAYERS)
    }
    asymlora.write_adapter(path, config, tensors)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("signals")
    return _model_dir(root / "model"), _adapter(root / "adapter.safetensors")


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    base, adapter = inputs
    out = tmp_path_factory.mktemp("reference") / "merged"
    asymlora.merge_files(base, adapter, out, threads=1)
    return out


def _command(kind: str) -> list[str]:
    if kind == "console script":
        return [sys.executable, "-m", "asymlora.cli"]
    return [os.environ["ASYMLORA_BIN"]]


KINDS = ["console script"] + (["binary"] if os.environ.get("ASYMLORA_BIN") else [])


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _same_output(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
        if name.endswith(".safetensors"):
            safetensors.numpy.load_file(str(out / name))  # valid, loadable


def _unmarked_and_empty(temporary: Path) -> bool:
    """A temporary killed between its creation and its marker's: nothing in it."""
    return temporary.is_dir() and all(
        p.name == MARKER and p.stat().st_size == 0 for p in temporary.iterdir()
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_random_kills_leave_out_absent_or_complete(kind, inputs, reference, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    args = [*_command(kind), "merge", str(base), str(adapter), "-o", str(out), "--threads", "1"]
    t0 = time.monotonic()
    subprocess.run([*_command(kind), "--version"], capture_output=True, check=True)
    startup = time.monotonic() - t0
    t0 = time.monotonic()
    full = subprocess.run(args, capture_output=True, text=True, check=False)
    duration = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    _same_output(out, reference)
    args.append("--force")  # later runs replace it, or write it anew

    rng = random.Random(20261203)
    outcomes = []
    for i in range(12):
        sig = signal.SIGKILL if i % 2 else signal.SIGTERM
        if rng.random() < 0.5 and out.exists():
            _remove(out)  # half the time there is no OUT to replace
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        # Mostly while it merges (after the start-up, which is most of a run here).
        time.sleep(rng.uniform(0.8 * startup, 1.05 * duration))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        outcomes.append((sig.name, proc.returncode))
        if out.exists():
            _same_output(out, reference)
        if sig == signal.SIGTERM:
            assert proc.returncode in (0, 128 + sig, -sig), err
            if proc.returncode == 128 + sig:
                assert err.splitlines()[-1] == (
                    "asymlora: interrupted by SIGTERM; nothing was written"
                ), err
            # Stopped cleanly, or killed before it wrote anything: nothing hidden left
            # but what an earlier SIGKILL left and this run did not reach to remove.
        for name in _hidden(tmp_path):
            assert name.startswith(".out.asymlora-") and name.endswith(".tmp"), name
            temporary = tmp_path / name
            assert (temporary / MARKER).is_file() or _unmarked_and_empty(temporary), name

    left = [n for n in _hidden(tmp_path) if not _unmarked_and_empty(tmp_path / n)]
    final = subprocess.run(args, capture_output=True, text=True, check=False)
    assert final.returncode == 0, final.stderr
    _same_output(out, reference)
    stale = [line for line in final.stderr.splitlines() if "stale temporary" in line]
    if left:
        assert len(stale) == 1, final.stderr
        assert stale[0].startswith(f"asymlora: warning: removed {len(left)} stale temporary")
        assert all(name in stale[0] for name in left), (left, stale)
    else:
        assert stale == [], final.stderr
    assert [n for n in _hidden(tmp_path) if not _unmarked_and_empty(tmp_path / n)] == []
    assert any(code == -signal.SIGKILL for _, code in outcomes), outcomes


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _killed_merge(inputs, out: Path) -> str:
    """Runs the console script's merge into ``out`` and SIGKILLs it once its temporary
    holds output; returns the temporary's name."""
    base, adapter = inputs
    args = [*_command("console script"), "merge", str(base), str(adapter), "-o", str(out)]
    proc = subprocess.Popen([*args, "--threads", "1"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        hidden = [
            p for p in out.parent.glob(f".{out.name}.asymlora-*.tmp") if (p / out.name).exists()
        ]
        if hidden:
            proc.kill()
            proc.wait()
            return hidden[0].name
        assert proc.poll() is None, "the merge finished before it could be killed"
        time.sleep(0.001)
    raise AssertionError("no temporary appeared")


def test_merge_files_removes_and_reports_stale_temporaries(inputs, reference, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    name = _killed_merge(inputs, out)
    assert not out.exists()
    marker = (tmp_path / name / MARKER).read_text()
    assert marker.startswith("asymlora merge temporary v1\npid ")
    with pytest.warns(UserWarning, match=r"removed 1 stale temporary output\(s\)") as caught:
        report = asymlora.merge_files(base, adapter, out, threads=1)
    assert any(name in str(w.message) for w in caught)
    assert any(name in w for w in report.warnings)
    assert _hidden(tmp_path) == []
    _same_output(out, reference)


def test_stale_single_file_temporary_is_removed(inputs, tmp_path):
    base, adapter = inputs
    single = tmp_path / "base.safetensors"
    tensors = safetensors.numpy.load_file(str(base / "model-00001-of-00002.safetensors"))
    tensors.update(safetensors.numpy.load_file(str(base / "model-00002-of-00002.safetensors")))
    safetensors.numpy.save_file(tensors, str(single))
    out = tmp_path / "merged.safetensors"
    args = [*_command("console script"), "merge", str(single), str(adapter), "-o", str(out)]
    proc = subprocess.Popen([*args, "--threads", "1"], stderr=subprocess.DEVNULL)
    while not list(tmp_path.glob(".merged.safetensors.asymlora-*.tmp/merged.safetensors")):
        assert proc.poll() is None, "the merge finished before it could be killed"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert len(_hidden(tmp_path)) == 1
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "asymlora: warning: removed 1 stale temporary output(s)" in done.stderr
    assert _hidden(tmp_path) == []
    expected = tmp_path / "expected.safetensors"
    asymlora.merge_files(single, adapter, expected)
    assert out.read_bytes() == expected.read_bytes()


def test_a_running_merges_temporary_is_kept(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "merged"
    # A temporary owned by this (running) process: the merge must leave it alone.
    stat = Path("/proc/self/stat").read_text()
    start = stat.rsplit(")", 1)[1].split()[19]
    host = Path("/proc/sys/kernel/hostname").read_text().strip()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    live = tmp_path / ".merged.asymlora-live01.tmp"
    live.mkdir()
    (live / MARKER).write_text(
        f"asymlora merge temporary v1\npid {os.getpid()}\nhost {host}\nboot {boot}\nstart {start}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asymlora.merge_files(base, adapter, out, threads=1)
    assert _hidden(tmp_path) == [live.name]


def _big_merge_in_progress(inputs, out: Path, on_progress) -> None:
    base, adapter = inputs
    asymlora.merge_files(base, adapter, out, threads=1, fsync=False, progress=on_progress)


def test_sigterm_stops_merge_files_and_restores_handlers(inputs, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    seen = {}

    def on_progress(p: asymlora.MergeProgress) -> None:
        if not seen:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the merge's next poll

    out = tmp_path / "merged"
    with pytest.raises(Interrupted) as raised:
        _big_merge_in_progress(inputs, out, on_progress)
    assert isinstance(raised.value, KeyboardInterrupt)
    assert raised.value.signum == signal.SIGTERM
    assert raised.value.signal_name == "SIGTERM"
    assert "interrupted by SIGTERM" in str(raised.value)
    assert seen["handler"] not in (signal.SIG_DFL, before[signal.SIGTERM])
    assert {s: signal.getsignal(s) for s in before} == before
    assert not out.exists()
    assert _hidden(tmp_path) == []


def test_merge_files_keeps_own_and_ignored_handlers(inputs, tmp_path):
    got = []

    def own(signum, frame):
        got.append(signum)

    previous = signal.signal(signal.SIGTERM, own), signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        seen = {}

        def on_progress(p: asymlora.MergeProgress) -> None:
            seen.setdefault("term", signal.getsignal(signal.SIGTERM))
            seen.setdefault("hup", signal.getsignal(signal.SIGHUP))

        _big_merge_in_progress(inputs, tmp_path / "merged", on_progress)
        assert seen == {"term": own, "hup": signal.SIG_IGN}
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGHUP, previous[1])


def test_merge_files_off_the_main_thread_installs_nothing(inputs, tmp_path):
    seen = {}
    errors = []

    def on_progress(p: asymlora.MergeProgress) -> None:
        seen.setdefault("term", signal.getsignal(signal.SIGTERM))

    def work() -> None:
        try:
            _big_merge_in_progress(inputs, tmp_path / "merged", on_progress)
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []
    assert seen["term"] is signal.SIG_DFL
    assert (tmp_path / "merged").is_dir()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_console_script_stops_cleanly_on_signals(sig, inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    args = [*_command("console script"), "merge", str(base), str(adapter), "-o", str(out)]
    proc = subprocess.Popen([*args, "--threads", "1"], stderr=subprocess.PIPE, text=True)
    while not any((tmp_path / n / "out").exists() for n in _hidden(tmp_path)):
        assert proc.poll() is None, "the merge finished before it could be interrupted"
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == f"asymlora: interrupted by {sig.name}; nothing was written\n"
    assert not out.exists()
    assert _hidden(tmp_path) == []
