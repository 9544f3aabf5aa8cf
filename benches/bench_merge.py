"""Offline merge of a LoRA into a sharded bf16 Llama-shaped checkpoint: asymlora vs PEFT vs cp.

The benchmark writes its own checkpoint (default: hidden 2048, intermediate 5632, 22
layers, 16 heads / 4 KV heads, vocab 32000, untied head: 1.12 G parameters, 2.25 GB in
bf16) as two real safetensors shards with ``model.safetensors.index.json`` and a
``config.json``, an asymlora adapter (r=16, alpha=32 on q, k, v, o, gate, up, down of
every layer; B float32) and the equivalent PEFT adapter directory (``export_peft``: the
same A, materialised). Then, median of ``--repeats`` interleaved runs, each in its own
subprocess (wall time, and peak RSS from ``os.wait4``):

1. ``asymlora merge BASE ADAPTER -o OUT`` (seed-plus-B; A regenerated),
2. ``asymlora merge BASE PEFT_DIR -o OUT``,
3. PEFT's path: ``AutoModelForCausalLM.from_pretrained`` (bf16), ``PeftModel.from_pretrained``,
   ``merge_and_unload``, ``save_pretrained`` (same shard size),
4. ``cp -r BASE OUT`` (the floor).

The asymlora runs use ``--no-fsync``, as neither cp nor ``save_pretrained`` flushes to
disk; one more pair of rows compares asymlora's default (fsync every file) with
``cp -r && sync``. Every output is deleted and ``sync`` run before each timed run, so no
run pays for another's writeback. Finally the outputs are compared: asymlora vs PEFT
(within one bf16 ulp?), both vs the float64 reference ``round(W + s * B @ A)``, the
untouched tensors, and the two asymlora outputs (identical bits?).

    bash benches/run.sh merge [--repeats 3] [--workdir DIR] [--threads N] [--json PATH]
    python benches/bench_merge.py --quick     # small checkpoint, smoke test (~15 s)

The work directory (default: a new one under the system temp dir, removed at the end;
``--keep`` keeps it) needs about 4.5x the checkpoint size free; that is checked first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The fused 3-D expert parameters of a transformers-5 MoE model (PEFT's target_parameters).
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
FULL = {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 16, "kv_heads": 4}
FULL.update(vocab=32000, shards=2)
QUICK = {"hidden": 256, "intermediate": 704, "layers": 2, "heads": 4, "kv_heads": 2}
QUICK.update(vocab=1024, shards=2)
# --model mixtral: 8 experts (top 2) per layer, LoRA on attention and on the experts.
MIXTRAL = {"hidden": 1024, "intermediate": 1792, "layers": 8, "heads": 16, "kv_heads": 4}
MIXTRAL.update(vocab=16000, experts=8, shards=2)
MIXTRAL_QUICK = {"hidden": 128, "intermediate": 224, "layers": 2, "heads": 4, "kv_heads": 2}
MIXTRAL_QUICK.update(vocab=512, experts=4, shards=2)
# --scale: Llama-2-7B-shaped layers, a 2 GB checkpoint in one shard against one of
# 16.7 GB in 8 shards of the same size.
SEVEN_B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000}
SCALE = ({**SEVEN_B, "layers": 4, "shards": 1}, {**SEVEN_B, "layers": 40, "shards": 8})
SCALE_QUICK = ({**QUICK, "shards": 1}, {**QUICK, "layers": 8, "shards": 4})
SCALE, SCALE_QUICK = ([{**c, "peft": 0} for c in cases] for cases in (SCALE, SCALE_QUICK))
RANK, ALPHA, SEED = 16, 32.0, 1234

# Targets from the issue.
MAX_VS_CP = 1.5  # asymlora time / cp time
MIN_SPEEDUP_VS_PEFT = 5.0  # PEFT time / asymlora time
MAX_RSS_VS_PEFT = 0.25  # asymlora peak RSS / PEFT peak RSS
MAX_SCALE_DRIFT = 1.10  # --scale: peak RSS and seconds per GB, large / small case


# --------------------------------------------------------------------------- data


def _shapes(cfg: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``LlamaForCausalLM`` (untied head), in model order; with
    ``experts`` in ``cfg``, of ``MixtralForCausalLM`` as saved (one linear per expert)."""
    h, i, kv = cfg["hidden"], cfg["intermediate"], cfg["hidden"] // cfg["heads"] * cfg["kv_heads"]
    e = cfg.get("experts")
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab"], h)}
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (h, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, h)
        if e:
            # as save_pretrained writes it (and the Hub holds it): one linear per expert
            shapes[f"{p}.block_sparse_moe.gate.weight"] = (e, h)
            for x in range(e):
                shapes[f"{p}.block_sparse_moe.experts.{x}.w1.weight"] = (i, h)
                shapes[f"{p}.block_sparse_moe.experts.{x}.w2.weight"] = (h, i)
                shapes[f"{p}.block_sparse_moe.experts.{x}.w3.weight"] = (i, h)
        else:
            shapes[f"{p}.mlp.gate_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (i, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg["vocab"], h)
    return shapes


def _model_config(cfg: dict[str, int]):
    import transformers

    common = dict(
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        vocab_size=cfg["vocab"],
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    if cfg.get("experts"):
        return transformers.MixtralConfig(
            num_local_experts=cfg["experts"], num_experts_per_tok=2, **common
        )
    return transformers.LlamaConfig(**common)


def build_base(base: Path, cfg: dict[str, int]) -> int:
    """Writes the checkpoint (``cfg["shards"]`` shards of about equal size + index +
    config.json); returns the largest shard's size.

    Runs in a worker process (``--build``): this process stays small and torch-free."""
    import torch
    from safetensors.torch import save_file

    base.mkdir(parents=True)
    shapes = _shapes(cfg)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    gen = torch.Generator().manual_seed(0)
    n = cfg["shards"]
    shard_names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    written, size, k, largest = 0, 0, 0, 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[name] = t
        weight_map[name] = shard_names[k]
        size += t.numel() * 2
        if k < n - 1 and written + size >= total * (k + 1) / n:
            save_file(shard, str(base / shard_names[k]), metadata={"format": "pt"})
            largest, written = max(largest, size), written + size
            shard, size, k = {}, 0, k + 1
    save_file(shard, str(base / shard_names[k]), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    _model_config(cfg).save_pretrained(base)
    return max(largest, size)


def adapted_modules(cfg: dict[str, int]) -> dict[str, object]:
    """The adapter's modules: every linear named in TARGETS and, for an MoE model, the
    experts as the model holds them in memory (transformers 5: fused 3-D parameters,
    PEFT's ``target_parameters``; one stream per expert)."""
    import asymlora

    modules, stream = {}, 0
    for name, shape in _shapes(cfg).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            d_out, d_in = shape
            modules[module] = asymlora.ModuleConfig(d_in=d_in, d_out=d_out, stream=stream)
            stream += 1
    if cfg.get("experts"):
        e, h, i = cfg["experts"], cfg["hidden"], cfg["intermediate"]
        for layer in range(cfg["layers"]):
            for target, (d_out, d_in) in zip(EXPERT_TARGETS, ((2 * i, h), (h, i))):
                modules[f"model.layers.{layer}.mlp.{target}"] = asymlora.ModuleConfig(
                    d_in=d_in, d_out=d_out, stream=stream, kind="parameter", experts=e
                )
                stream += e
    return modules


def _expert_part(name: str, cfg: dict[str, int]) -> tuple[str, int, slice] | None:
    """For a per-expert tensor of the checkpoint: the fused module, expert and rows of
    its block that it holds (w1: gate, rows 0..I; w3: up, rows I..2I; w2: down)."""
    if ".block_sparse_moe.experts." not in name:
        return None
    layer, rest = name.split(".block_sparse_moe.experts.")
    e, w, _ = rest.split(".")
    i = cfg["intermediate"]
    target, rows = {
        "w1": ("experts.gate_up_proj", slice(0, i)),
        "w3": ("experts.gate_up_proj", slice(i, 2 * i)),
        "w2": ("experts.down_proj", slice(None)),
    }[w]
    return f"{layer}.mlp.{target}", int(e), rows


def build_adapters(base: Path, v1: Path, peft_dir: Path | None, cfg: dict[str, int]) -> None:
    import asymlora

    modules = adapted_modules(cfg)
    config = asymlora.AdapterConfig(
        rank=RANK, alpha=ALPHA, seed=SEED, modules=modules, base_model={"name_or_path": str(base)}
    )
    rng = np.random.default_rng(1)
    tensors = {}
    for m, c in modules.items():
        shape = (c.d_out, RANK) if c.experts is None else (c.experts, c.d_out, RANK)
        tensors[f"{m}.lora_B"] = rng.standard_normal(shape, dtype=np.float32) * 0.01
    asymlora.write_adapter(v1, config, tensors)
    if peft_dir is not None:
        asymlora.export_peft(v1, peft_dir)


# --------------------------------------------------------------------------- running


def _hwm(pid: int) -> int:
    """``VmHWM`` (peak resident set, bytes) of a live process, or 0."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of ``cmd`` in its own process.

    The peak is the process's ``VmHWM`` (the high-water mark of its own address space
    since its exec), polled every 2 ms until it exits: ``ru_maxrss`` from ``wait4``
    would include the pages of this (parent) process that the child had until its exec.
    """
    os.sync()  # no earlier writeback pending
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            time.sleep(0.002)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, error = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{error}{text}")
    return seconds, peak, text


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


PEFT_WORKER = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, peft
t1 = time.perf_counter()
base, adapter, out, shard = sys.argv[1:5]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
t2 = time.perf_counter()
model = peft.PeftModel.from_pretrained(model, adapter)
t3 = time.perf_counter()
model = model.merge_and_unload()
t4 = time.perf_counter()
model.save_pretrained(out, max_shard_size=int(shard))
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "peft_load": t3 - t2,
                  "merge": t4 - t3, "save": t5 - t4}))
"""


def methods(args, work: Path, shard_size: int) -> dict[str, list[str]]:
    exe = shutil.which("asymlora", path=str(Path(sys.executable).parent)) or "asymlora"
    threads = ["--threads", str(args.threads)] if args.threads else []
    base, out = work / "base", work / "out"
    v1, peft = str(work / "adapter.safetensors"), str(work / "peft")
    durable = ["-o", str(out), "--quiet", *threads]
    fast = [*durable, "--no-fsync"]
    one_thread = ["-o", str(out), "--quiet", "--no-fsync", "--threads", "1"]
    return {
        "asymlora (seed+B)": [exe, "merge", str(base), v1, *fast],
        "asymlora (PEFT dir)": [exe, "merge", str(base), peft, *fast],
        "PEFT merge_and_unload": [
            sys.executable,
            "-c",
            PEFT_WORKER,
            str(base),
            peft,
            str(out),
            str(shard_size),
        ],
        "cp -r": ["cp", "-r", str(base), str(out)],
        "asymlora, fsync (default)": [exe, "merge", str(base), v1, *durable],
        "cp -r && sync": ["sh", "-c", f"cp -r '{base}' '{out}' && sync"],
        "asymlora (seed+B), 1 thread": [exe, "merge", str(base), v1, *one_thread],
    }


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 rounded once (round to odd in float32, then to nearest even)."""
    import ml_dtypes

    x32 = x.astype(np.float32)
    back = x32.astype(np.float64)
    inexact = back != x
    toward_zero = inexact & (np.abs(back) > np.abs(x))
    bits = (x32.view(np.uint32) - toward_zero.astype(np.uint32)) | inexact.astype(np.uint32)
    return bits.view(np.float32).astype(ml_dtypes.bfloat16)


def _ordered(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as integers ordered like the values (for ulp distances)."""
    b = bits.astype(np.int32)
    return np.where(b & 0x8000, -(b & 0x7FFF), b)


def _tensors(directory: Path) -> dict[str, tuple[Path, str]]:
    from asymlora._safetensors import SafetensorsFile

    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        for name in SafetensorsFile(path).names:
            found[name] = (path, name)
    return found


def compare(work: Path, outputs: dict[str, Path], cfg: dict[str, int]) -> dict[str, object]:
    import asymlora
    from asymlora._safetensors import SafetensorsFile

    adapter = asymlora.read_adapter(work / "adapter.safetensors")
    files: dict[Path, SafetensorsFile] = {}

    def read(where: dict[str, tuple[Path, str]], name: str) -> np.ndarray:
        path, key = where[name]
        if path not in files:
            files[path] = SafetensorsFile(path)
        return files[path].read({"t": key})["t"]

    base = _tensors(work / "base")
    found = {k: _tensors(p) for k, p in outputs.items()}
    ours, theirs = "asymlora (seed+B)", "PEFT merge_and_unload"
    n = 0
    exact = {k: 0 for k in outputs}
    max_ulp_vs_ref = {k: 0 for k in outputs}
    max_ulp_vs_peft, beyond_one_ulp, beyond_and_ours_exact = 0, 0, 0
    modules = adapter.config.modules
    for name in base:
        w = read(base, name)
        module, part = name.removesuffix(".weight"), _expert_part(name, cfg)
        if part is not None:
            module = part[0]
        if module not in modules:
            for k in outputs:
                if not np.array_equal(read(found[k], name).view(np.uint16), w.view(np.uint16)):
                    exact[k] = -(10**9)  # an untouched tensor changed: flag loudly
            continue
        a = adapter.lora_A(module).astype(np.float64)
        b = adapter.lora_B(module).astype(np.float64)
        if part is not None:  # expert e's rows of the fused module
            a, b = a[part[1]], b[part[1]][part[2]]
        exact_value = w.astype(np.float64) + adapter.config.scale(module) * (b @ a)
        ref = _round_bf16(exact_value).view(np.uint16)
        n += ref.size
        got = {k: read(found[k], name).view(np.uint16) for k in outputs}
        for k, g in got.items():
            exact[k] += int(np.count_nonzero(g == ref))
            far = int(np.abs(_ordered(g) - _ordered(ref)).max())
            max_ulp_vs_ref[k] = max(max_ulp_vs_ref[k], far)
        d = np.abs(_ordered(got[ours]) - _ordered(got[theirs]))
        max_ulp_vs_peft = max(max_ulp_vs_peft, int(d.max()))
        beyond_one_ulp += int(np.count_nonzero(d > 1))
        beyond_and_ours_exact += int(np.count_nonzero((d > 1) & (got[ours] == ref)))
        files.clear()
    digests = {}
    for k in ("asymlora (seed+B)", "asymlora (PEFT dir)"):
        h = hashlib.sha256()
        for path in sorted(outputs[k].glob("*.safetensors")):
            h.update(path.read_bytes())
        digests[k] = h.hexdigest()
    return {
        "merged_values": n,
        "equal_to_float64_reference": exact,
        "max_ulp_asymlora_vs_peft": max_ulp_vs_peft,
        "values_beyond_one_ulp_asymlora_vs_peft": beyond_one_ulp,
        "of_which_asymlora_equals_reference": beyond_and_ours_exact,
        "max_ulp_vs_reference": max_ulp_vs_ref,
        "asymlora_outputs_identical": len(set(digests.values())) == 1,
    }


def run_scale(args, cases: list[dict[str, int]], repeats: int, work: Path) -> None:
    """``--scale``: does memory stay flat and time per GB constant as the checkpoint grows?

    asymlora (seed+B, ``--no-fsync``) and ``cp -r`` on each case, rounds interleaved."""
    import asymlora

    exe = shutil.which("asymlora", path=str(Path(sys.executable).parent)) or "asymlora"
    threads = ["--threads", str(args.threads)] if args.threads else []
    out = work / "out"
    cmds: dict[tuple[int, str], list[str]] = {}
    for k, cfg in enumerate(cases):
        t0 = time.perf_counter()
        case = work / f"case{k}"
        build = [sys.executable, __file__, "--build", str(case), "--config", json.dumps(cfg)]
        subprocess.run(build, check=True, capture_output=True)
        print(
            f"case {k}: {_size(cfg) / 1e9:.2f} GB bf16 in {cfg['shards']} shards, "
            f"{len(adapted_modules(cfg))} adapted modules; "
            f"built in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        v1, base = str(case / "adapter.safetensors"), str(case / "base")
        cmds[k, "asymlora"] = [exe, "merge", base, v1, "-o", str(out), "--quiet", "--no-fsync"]
        cmds[k, "asymlora"] += threads
        cmds[k, "cp -r"] = ["cp", "-r", base, str(out)]
    times: dict[tuple[int, str], list[float]] = {k: [] for k in cmds}
    rss: dict[tuple[int, str], list[int]] = {k: [] for k in cmds}
    for r in range(repeats):
        for key, cmd in cmds.items():
            remove(out)
            seconds, peak, _ = timed(cmd)
            times[key].append(seconds)
            rss[key].append(peak)
            label = f"round {r + 1}/{repeats} case {key[0]} {key[1]:<9}"
            print(f"  {label} {seconds:7.2f} s", flush=True)
    remove(out)
    # the large case once more through the API: every tensor written, sizes equal
    large = work / f"case{len(cases) - 1}"
    report = asymlora.merge_files(large / "base", large / "adapter.safetensors", out, fsync=False)
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (large / "base", out)]
    remove(out)

    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in rss.items()}
    gb = [_size(c) / 1e9 for c in cases]
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"asymlora {asymlora.__version__}; median of {repeats}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}"
    )
    print()
    header = f"{'case':<22} {'method':<9} {'median s':>9} {'s per GB':>9} {'peak RSS':>10}"
    header += f" {'vs cp':>7}"
    print(header)
    print("-" * len(header))
    for (k, name), m in med.items():
        label = f"{gb[k]:.2f} GB, {cases[k]['shards']} shards"
        print(
            f"{label:<22} {name:<9} {m:>9.2f} {m / gb[k]:>9.3f} {peak[k, name] / 2**20:>6.0f} MiB "
            f"{m / med[k, 'cp -r']:>6.2f}x"
        )
    last = len(cases) - 1
    rss_ratio = peak[last, "asymlora"] / peak[0, "asymlora"]
    per_gb = [med[k, "asymlora"] / gb[k] for k in (0, last)]
    cp_per_gb = [med[k, "cp -r"] / gb[k] for k in (0, last)]
    verdicts = [
        (f"peak RSS, large / small case <= {MAX_SCALE_DRIFT}", rss_ratio),
        (f"seconds per GB, large / small case <= {MAX_SCALE_DRIFT}", per_gb[1] / per_gb[0]),
    ]
    print()
    for text, value in verdicts:
        print(f"  {'met    ' if value <= MAX_SCALE_DRIFT else 'NOT MET'}  {text} ({value:.2f})")
    print(f"  (cp -r: seconds per GB, large / small case {cp_per_gb[1] / cp_per_gb[0]:.2f})")
    print(
        f"  large case through merge_files: {report.merged} tensors merged "
        f"({report.modules} modules), "
        f"output {sizes[1]:,} bytes, base {sizes[0]:,} bytes"
    )
    if args.json:
        record = {
            "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
            "machine": {"arch": platform.machine(), "cores": os.cpu_count()},
            "cases": cases,
            "bytes": [_size(c) for c in cases],
            "repeats": repeats,
            "seconds": {f"{k}:{n}": v for (k, n), v in times.items()},
            "peak_rss_bytes": {f"{k}:{n}": v for (k, n), v in peak.items()},
            "targets": [{"check": t, "value": v, "met": v <= MAX_SCALE_DRIFT} for t, v in verdicts],
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.json}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="asymlora --threads")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--quick", action="store_true", help="small checkpoint (smoke test)")
    parser.add_argument(
        "--model",
        choices=("llama", "mixtral"),
        default="llama",
        help="mixtral: an MoE checkpoint (fused experts), LoRA on attention and the experts",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="memory at scale: asymlora and cp on a 2 GB and a 16.7 GB (8 shards) checkpoint",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the results here (default: benches/bench_merge.json; none with --quick)",
    )
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # worker: build data
    parser.add_argument("--config", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        shard_size = build_base(args.build / "base", args.config)
        build_adapters(
            args.build / "base",
            args.build / "adapter.safetensors",
            args.build / "peft" if args.config.get("peft", 1) else None,
            args.config,
        )
        print(shard_size)
        return
    repeats = 1 if args.quick else args.repeats
    if args.scale:
        cases = SCALE_QUICK if args.quick else SCALE
        # base and output of the large case, the small case's and its adapter files
        need = 2.2 * sum(_size(c) for c in cases)
    else:
        cfg = {
            ("llama", False): FULL,
            ("llama", True): QUICK,
            ("mixtral", False): MIXTRAL,
            ("mixtral", True): MIXTRAL_QUICK,
        }[args.model, args.quick]
        need = 4.5 * _size(cfg)
    if args.json is None and not args.quick:
        stem = "bench_merge" + ("_scale" if args.scale else "" if args.model == "llama" else "_moe")
        args.json = Path(__file__).resolve().parent / f"{stem}.json"

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        sys.exit(f"{parent}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB")
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=parent))
    try:
        if args.scale:
            run_scale(args, cases, repeats, work)
        else:
            run(args, cfg, repeats, work, _size(cfg))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _size(cfg: dict[str, int]) -> int:
    """Bytes of the bf16 checkpoint."""
    return sum(int(np.prod(s)) * 2 for s in _shapes(cfg).values())


def run(args, cfg: dict[str, int], repeats: int, work: Path, size: int) -> None:
    import asymlora

    t0 = time.perf_counter()
    build = [sys.executable, __file__, "--build", str(work), "--config", json.dumps(cfg)]
    shard_size = int(subprocess.run(build, check=True, capture_output=True).stdout)
    n_params = size // 2
    targets = TARGETS[:4] + EXPERT_TARGETS if cfg.get("experts") else TARGETS
    print(
        f"checkpoint ({args.model}): {n_params / 1e9:.2f} G parameters, {size / 1e9:.2f} GB "
        f"bf16, {cfg['shards']} shards; adapter r={RANK} on {len(adapted_modules(cfg))} "
        f"modules ({', '.join(targets)}) "
        f"({(work / 'adapter.safetensors').stat().st_size / 1e6:.0f} MB seed+B, "
        f"{(work / 'peft' / 'adapter_model.safetensors').stat().st_size / 1e6:.0f} MB PEFT); "
        f"built in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    cmds = methods(args, work, shard_size)
    out = work / "out"
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[int]] = {k: [] for k in cmds}
    phases: list[dict[str, float]] = []
    for r in range(repeats):
        for name, cmd in cmds.items():
            remove(out)
            seconds, peak, text = timed(cmd)
            times[name].append(seconds)
            rss[name].append(peak)
            if name.startswith("PEFT") and text.strip():
                phases.append(json.loads(text.strip().splitlines()[-1]))
            print(f"  round {r + 1}/{repeats} {name:<26} {seconds:7.2f} s", flush=True)
    remove(out)

    # one more output of each merge, kept side by side, for the comparison (the first
    # through the Python API, for its report)
    outputs = {"asymlora (seed+B)": work / "out-0"}
    report = asymlora.merge_files(
        work / "base", work / "adapter.safetensors", outputs["asymlora (seed+B)"], fsync=False
    )
    for name in ("asymlora (PEFT dir)", "PEFT merge_and_unload"):
        target = work / f"out-{len(outputs)}"
        cmd = [str(target) if c == str(out) else c for c in cmds[name]]
        timed(cmd)
        outputs[name] = target
    checks = compare(work, outputs, cfg)
    checks["recomputed_in_float64"] = report.recomputed

    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in rss.items()}
    cp, peft = med["cp -r"], med["PEFT merge_and_unload"]
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"asymlora {asymlora.__version__}, torch {version('torch')}, peft {version('peft')}, "
        f"transformers {version('transformers')}; "
        f"median of {repeats}, {datetime.now(timezone.utc):%Y-%m-%d}"
    )
    print()
    header = (
        f"{'method':<27} {'median s':>9} {'min s':>7} {'peak RSS':>10} {'vs cp':>7} {'PEFT/x':>7}"
    )
    print(header)
    print("-" * len(header))
    for k in cmds:
        floor = med["cp -r && sync"] if "sync" in k or "fsync" in k else cp
        print(
            f"{k:<27} {med[k]:>9.2f} {min(times[k]):>7.2f} {peak[k] / 2**20:>6.0f} MiB "
            f"{med[k] / floor:>6.2f}x {peft / med[k]:>6.1f}x"
        )
    print("(vs cp: the fsync rows against `cp -r && sync`; PEFT/x: PEFT's time over the row's)")
    if phases:
        ph = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
        print("PEFT phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    print()
    verdicts = []
    for k in ("asymlora (seed+B)", "asymlora (PEFT dir)"):
        verdicts += [
            (f"{k}: time <= {MAX_VS_CP}x cp", med[k] / cp, med[k] / cp <= MAX_VS_CP),
            (
                f"{k}: >= {MIN_SPEEDUP_VS_PEFT:.0f}x faster than PEFT",
                peft / med[k],
                peft / med[k] >= MIN_SPEEDUP_VS_PEFT,
            ),
            (
                f"{k}: peak RSS <= 1/4 of PEFT's",
                peak[k] / peak["PEFT merge_and_unload"],
                peak[k] / peak["PEFT merge_and_unload"] <= MAX_RSS_VS_PEFT,
            ),
        ]
    for text, value, ok in verdicts:
        print(f"  {'met    ' if ok else 'NOT MET'}  {text} ({value:.2f})")
    n = checks["merged_values"]
    print()
    print(f"outputs, {n:,} merged bf16 values:")
    for k, same in checks["equal_to_float64_reference"].items():
        print(f"  {k:<24} equal to round(W + s*B@A in float64): {same / n:.6%}")
    for k, far in checks["max_ulp_vs_reference"].items():
        print(f"  {k:<24} farthest from the reference: {far} ulp")
    beyond = checks["values_beyond_one_ulp_asymlora_vs_peft"]
    print(
        f"  asymlora vs PEFT: {n - beyond:,} of {n:,} within 1 ulp ({(n - beyond) / n:.6%}); "
        f"max {checks['max_ulp_asymlora_vs_peft']} ulp; at the {beyond} values beyond 1 ulp, "
        f"asymlora equals the reference at {checks['of_which_asymlora_equals_reference']}"
    )
    print(
        f"  asymlora outputs from the seed+B file and the PEFT dir identical: "
        f"{checks['asymlora_outputs_identical']}"
    )
    print(
        f"  asymlora values recomputed in float64 (float32 not provably exact): "
        f"{checks['recomputed_in_float64']:,} ({checks['recomputed_in_float64'] / n:.3%})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "date": f"{datetime.now(timezone.utc):%Y-%m-%d}",
            "machine": {"arch": platform.machine(), "cores": os.cpu_count()},
            "config": cfg,
            "bytes": size,
            "repeats": repeats,
            "seconds": times,
            "median_seconds": med,
            "peak_rss_bytes": peak,
            "peft_phases": phases,
            "targets": [{"check": t, "value": v, "met": ok} for t, v, ok in verdicts],
            "outputs": checks,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
