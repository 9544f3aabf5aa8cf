"""Training steps of a Llama-shaped model: asymlora train='B' vs PEFT LoRA vs no adapter.

Model: ``LlamaForCausalLM`` built from a config (default hidden 1024, 8 layers,
intermediate 2816, 16 heads, vocab 8192; seq 256, batch 8), same base weights
(``torch.manual_seed``) and same random batch for every method; loss with
``labels=input_ids``; AdamW on the trainable parameters. LoRA r=16, alpha=32 on
q, k, v, o, gate, up, down. Methods:

* ``none``: the frozen model, no adapter (forward + backward, no optimizer);
* ``asymlora-B``: ``asymlora.wrap(..., train="B")``, A frozen random orthogonal;
* ``peft-lora``: ``peft.get_peft_model`` with the same r, alpha, targets, dropout 0;
* ``asymlora-AB``: classic LoRA in asymlora's layer (A and B trained), for reference.

Every method feeds ``inputs_embeds`` that require grad, so backward runs through all
layers in each of them (as in LoRA training) and the methods differ only by the
adapter. Each method runs in its own fresh subprocess (per-method peak RSS); rounds
over the methods are interleaved (``--repeats``) so machine drift hits all alike.
Then one more subprocess holds one model per method and alternates single steps
between them (``--paired-steps`` rounds): the overhead is also given as the median of
per-round differences to the ``none`` step, which cancels drift slower than a step.
Reported: median step time over all timed steps (min, max), adapter overhead
(step minus the ``none`` step) and its ratio to PEFT's, peak memory (CPU: peak RSS
and its growth over the RSS of the built model; CUDA: ``max_memory_allocated``),
trainable parameters, adapter file bytes, and the bytes of tensors saved for
backward in one forward (activations only, deduplicated by storage).

    bash benches/run.sh train [--repeats 3] [--steps 5] [--warmup 2] [--paired-steps 8]
    python benches/bench_train.py --quick          # tiny model, smoke test (~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import current_rss_bytes, fmt, llama_from_config, mib, peak_rss_bytes, quartiles

METHODS = ("none", "asymlora-B", "peft-lora", "asymlora-AB")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUICK = {"hidden": 128, "layers": 2, "intermediate": 352, "seq": 64, "batch": 2, "vocab": 512}
QUICK_RUN = {"steps": 3, "warmup": 1, "repeats": 1, "paired_steps": 3}

# Targets from the issues.
MAX_OVERHEAD_RATIO = 0.5  # asymlora-B overhead / PEFT overhead, float base
MAX_OVERHEAD_RATIO_QUANTIZED = 1.0  # on a 4- or 8-bit base: no worse than PEFT's QLoRA
MAX_FILE_RATIO = 0.55  # asymlora-B adapter file / PEFT adapter file


# --------------------------------------------------------------------------- worker


def _build_model(args, torch, device, dtype):
    model = llama_from_config(
        torch, device, dtype, args, max_positions=max(args.seq, 128), use_cache=False
    )
    if args.base != "float":  # QLoRA: every projection in 4 (NF4) or 8 bits, head in float
        import asymlora

        bits = 4 if args.base == "nf4" else 8
        asymlora.quantize_bnb(model, bits, compute_dtype=dtype, device=device)
    return model.train()


def _add_adapter(method: str, model, args):
    if method == "none":
        return model
    if method in ("asymlora-B", "asymlora-AB"):
        import asymlora

        cfg = asymlora.LoraConfig(
            r=args.rank,
            alpha=args.alpha,
            target_modules=list(TARGETS),
            train="B" if method == "asymlora-B" else "AB",
        )
        return asymlora.wrap(model, cfg)
    if method == "peft-lora":
        import peft

        cfg = peft.LoraConfig(
            r=args.rank, lora_alpha=args.alpha, target_modules=list(TARGETS), lora_dropout=0.0
        )
        return peft.get_peft_model(model, cfg)
    raise ValueError(f"unknown method {method!r}")


def _adapter_bytes(method: str, model) -> int | None:
    if method == "none":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith("asymlora"):
            import asymlora

            path = Path(tmp) / "adapter.safetensors"
            asymlora.save_adapter(model, path)
        else:
            model.save_pretrained(tmp)
            path = Path(tmp) / "adapter_model.safetensors"
        return path.stat().st_size


def _saved_activation_bytes(torch, model, step_inputs) -> tuple[int, int]:
    """(bytes, tensors) saved for backward by one forward, excluding weights and buffers."""
    own = {t.untyped_storage().data_ptr() for t in model.parameters()}
    own |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**step_inputs()).loss
    del loss
    return sum(seen.values()), len(seen)


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    return torch, device, dtype, cuda, sync, ids


def _trainer(torch, method: str, model, ids, args):
    """(model, step_inputs, train_step, trainable) for ``method`` on a built model."""
    model = _add_adapter(method, model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step_inputs() -> dict:
        # Embeddings that require grad: backward runs through every layer, adapter or not.
        embeds = embed(ids).detach().requires_grad_()
        return {"inputs_embeds": embeds, "labels": ids}

    def train_step() -> float:
        loss = model(**step_inputs()).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step_inputs, train_step, sum(p.numel() for p in params)


def _timed(sync, train_step) -> tuple[float, float, float]:
    """(wall s, process CPU s, loss) of one training step."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    loss = train_step()
    sync()
    return time.perf_counter() - t, time.process_time() - c, loss


def run_worker(args) -> dict:
    """One method in this process: step times, peak memory, sizes."""
    torch, device, dtype, cuda, sync, ids = _setup(args)
    t0 = time.perf_counter()
    model = _build_model(args, torch, device, dtype)
    sync()
    build_s = time.perf_counter() - t0
    base_rss = current_rss_bytes() or peak_rss_bytes()
    base_cuda = torch.cuda.memory_allocated(device) if cuda else None
    model, step_inputs, train_step, trainable = _trainer(torch, args.worker, model, ids, args)

    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        wall, cpu, loss = _timed(sync, train_step)
        losses.append(loss)
        if i >= args.warmup:
            times.append(wall)
            cpu_times.append(cpu)
    peak_rss = peak_rss_bytes()
    peak_cuda = torch.cuda.max_memory_allocated(device) if cuda else None

    saved_bytes, saved_count = _saved_activation_bytes(torch, model, step_inputs)
    return {
        "method": args.worker,
        "times_s": times,
        "cpu_times_s": cpu_times,
        "build_s": build_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": trainable,
        "adapter_bytes": _adapter_bytes(args.worker, model),
        "saved_bytes": saved_bytes,
        "saved_tensors": saved_count,
        "base_rss": base_rss,
        "peak_rss": peak_rss,
        "base_cuda": base_cuda,
        "peak_cuda": peak_cuda,
    }


def run_paired_worker(args, methods: list[str]) -> dict:
    """All methods in one process, one model each, steps alternating between them.

    Timing only (memory is per process above). Drift slower than one step hits the
    methods of a round alike, so per-round differences cancel it.
    """
    torch, device, dtype, _cuda, sync, ids = _setup(args)
    steps = {}
    for method in methods:
        model = _build_model(args, torch, device, dtype)
        steps[method] = _trainer(torch, method, model, ids, args)[2]
    for method in methods:
        for _ in range(args.warmup):
            _timed(sync, steps[method])
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.paired_steps):
        order = methods[i % len(methods) :] + methods[: i % len(methods)]
        for method in order:
            times[method].append(_timed(sync, steps[method])[0])
    return {"times_s": times}


# --------------------------------------------------------------------------- driver


def _worker_argv(args, method: str, out: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", method, "--worker-out", out]
    for key in (
        "hidden",
        "layers",
        "intermediate",
        "seq",
        "batch",
        "vocab",
        "rank",
        "alpha",
        "steps",
        "warmup",
        "device",
        "dtype",
        "base",
        "threads",
        "paired_steps",
        "methods",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv


def _run_one(args, method: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.run(_worker_argv(args, method, out), env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker {method!r} failed with exit status {proc.returncode}")
        with open(out) as f:
            return json.load(f)


def summarize_paired(times: dict[str, list[float]]) -> dict[str, dict]:
    """Per method: median step, and the adapter overhead as the median of per-round
    differences to the ``none`` step of the same round (pairs cancel slow drift)."""
    summary: dict[str, dict] = {}
    none = times.get("none")
    for method, ts in times.items():
        s = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
        if none is not None:
            diffs = sorted(t - n for t, n in zip(ts, none))
            s["overhead_s"] = statistics.median(diffs)
            s["overhead_quartiles_s"] = quartiles(diffs)
        summary[method] = s
    peft = summary.get("peft-lora")
    for method, s in summary.items():
        ok = none is not None and peft is not None and peft["overhead_s"] > 0
        s["overhead_vs_peft"] = (
            s["overhead_s"] / peft["overhead_s"] if ok and method != "none" else None
        )
    return summary


def _ratio(s: dict) -> str:
    ratio = s.get("overhead_vs_peft")
    return "-" if ratio is None else f"{ratio:.2f}x"


def summarize(runs: dict[str, list[dict]], cuda: bool) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for method, results in runs.items():
        times = [t for r in results for t in r["times_s"]]
        key = "peak_cuda" if cuda else "peak_rss"
        base_key = "base_cuda" if cuda else "base_rss"
        peaks = [r[key] for r in results]
        growth = [r[key] - r[base_key] for r in results]
        summary[method] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "round_medians_s": [statistics.median(r["times_s"]) for r in results],
            "cpu_median_s": statistics.median(t for r in results for t in r["cpu_times_s"]),
            "n_steps": len(times),
            "peak_bytes": statistics.median(peaks),
            "peak_growth_bytes": statistics.median(growth),
            "trainable_params": results[0]["trainable_params"],
            "adapter_bytes": results[0]["adapter_bytes"],
            "saved_bytes": results[0]["saved_bytes"],
            "saved_tensors": results[0]["saved_tensors"],
            "first_loss": results[0]["first_loss"],
            "last_loss": results[0]["last_loss"],
        }
    none = summary.get("none")
    peft = summary.get("peft-lora")
    for s in summary.values():
        s["overhead_s"] = s["median_s"] - none["median_s"] if none else None
    if none and peft:
        for method, s in summary.items():
            if method == "none" or peft["overhead_s"] <= 0:
                s["overhead_vs_peft"] = None
                continue
            s["overhead_vs_peft"] = s["overhead_s"] / peft["overhead_s"]
            # Same ratio in process CPU time (all threads): less sensitive to other load.
            cpu_peft = peft["cpu_median_s"] - none["cpu_median_s"]
            s["cpu_overhead_vs_peft"] = (
                (s["cpu_median_s"] - none["cpu_median_s"]) / cpu_peft if cpu_peft > 0 else None
            )
            # The same ratio within each round (methods run back to back): its spread
            # shows how much of the difference is machine noise.
            per_round = []
            for m, n, p in zip(
                s["round_medians_s"], none["round_medians_s"], peft["round_medians_s"]
            ):
                if p - n > 0:
                    per_round.append((m - n) / (p - n))
            s["overhead_vs_peft_per_round"] = per_round
    return summary


def target_checks(
    summary: dict[str, dict], paired: dict[str, dict] | None, cuda: bool, base: str = "float"
) -> list[tuple[str, bool | None, str]]:
    ours, peft = summary.get("asymlora-B"), summary.get("peft-lora")
    if not ours or not peft:
        return []
    checks = []
    limit = MAX_OVERHEAD_RATIO if base == "float" else MAX_OVERHEAD_RATIO_QUANTIZED
    name = f"step overhead <= {limit}x PEFT's"
    ratio = ours.get("overhead_vs_peft")
    rounds = ours.get("overhead_vs_peft_per_round") or []
    spread = f"; per round {min(rounds):.2f} to {max(rounds):.2f}" if rounds else ""
    if len(rounds) > 1 and min(rounds) <= limit < max(rounds):
        spread += ", straddling the target: within the noise"
    cpu_ratio = ours.get("cpu_overhead_vs_peft")
    if cpu_ratio is not None:
        spread += f"; in CPU time {cpu_ratio:.2f}x"
    checks.append(
        (
            name + " (per-process medians)",
            None if ratio is None else ratio <= limit,
            "needs a none run and a positive PEFT overhead"
            if ratio is None
            else f"{ratio:.2f}x ({ours['overhead_s'] * 1e3:.0f} ms vs "
            f"{peft['overhead_s'] * 1e3:.0f} ms{spread})",
        )
    )
    if paired and "asymlora-B" in paired and "peft-lora" in paired:
        p_ours, p_peft = paired["asymlora-B"], paired["peft-lora"]
        p_ratio = p_ours.get("overhead_vs_peft")
        q_ours, q_peft = p_ours.get("overhead_quartiles_s"), p_peft.get("overhead_quartiles_s")
        detail = "needs a none run and a positive PEFT overhead"
        if p_ratio is not None:
            detail = (
                f"{p_ratio:.2f}x ({p_ours['overhead_s'] * 1e3:.0f} ms vs "
                f"{p_peft['overhead_s'] * 1e3:.0f} ms; quartiles of the per-round overhead "
                f"{q_ours[0] * 1e3:.0f} to {q_ours[1] * 1e3:.0f} ms vs "
                f"{q_peft[0] * 1e3:.0f} to {q_peft[1] * 1e3:.0f} ms)"
            )
        checks.append(
            (
                name + " (paired steps)",
                None if p_ratio is None else p_ratio <= limit,
                detail,
            )
        )
    what = "max_memory_allocated" if cuda else "peak RSS"
    checks.append(
        (
            f"peak training memory below PEFT's ({what})",
            ours["peak_bytes"] < peft["peak_bytes"],
            f"{mib(ours['peak_bytes'])} MiB vs {mib(peft['peak_bytes'])} MiB "
            f"(growth {mib(ours['peak_growth_bytes'])} vs {mib(peft['peak_growth_bytes'])})",
        )
    )
    file_ratio = ours["adapter_bytes"] / peft["adapter_bytes"]
    checks.append(
        (
            f"adapter file <= {MAX_FILE_RATIO}x PEFT's",
            file_ratio <= MAX_FILE_RATIO,
            f"{file_ratio:.3f}x ({ours['adapter_bytes']:,} vs {peft['adapter_bytes']:,} bytes)",
        )
    )
    if cuda:
        checks.append(
            (
                "GPU step time no worse than PEFT's",
                ours["median_s"] <= peft["median_s"],
                f"{ours['median_s'] * 1e3:.1f} ms vs {peft['median_s'] * 1e3:.1f} ms",
            )
        )
    return checks


def print_report(args, summary: dict[str, dict], paired, checks, cuda: bool) -> None:
    import torch

    import asymlora

    tokens = args.batch * args.seq
    print()
    print(
        f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.intermediate}, vocab {args.vocab}; batch {args.batch} x seq {args.seq} "
        f"= {tokens} tokens; LoRA r={args.rank}, alpha={args.alpha:g} on {len(TARGETS)} "
        f"projections; {args.dtype}, base {args.base}, AdamW"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, device={args.device}"
        f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, threads={args.threads}, "
        f"torch {torch.__version__}, asymlora {asymlora.__version__}; "
        f"{args.repeats} interleaved rounds x {args.steps} timed steps "
        f"(+{args.warmup} warm-up) per method"
    )
    print()
    mem = "peak alloc MiB" if cuda else "peak RSS MiB"
    header = (
        f"{'method':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} "
        f"{'overhead ms':>11} {'vs PEFT':>7} {mem:>14} {'growth MiB':>10} {'trainable':>10} "
        f"{'file bytes':>11} {'saved MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for method, s in summary.items():
        overhead = None if s["overhead_s"] is None else s["overhead_s"] * 1e3
        print(
            f"{method:<12} {s['median_s']:>9.3f} {s['min_s']:>7.3f} {s['max_s']:>7.3f} "
            f"{s['cpu_median_s']:>7.3f} {fmt(overhead, '>11.0f'):>11} {_ratio(s):>7} "
            f"{mib(s['peak_bytes']):>14} {mib(s['peak_growth_bytes']):>10} "
            f"{s['trainable_params']:>10,} {fmt(s['adapter_bytes'], ','):>11} "
            f"{mib(s['saved_bytes']):>9}"
        )
    if paired:
        print()
        print(
            f"paired: one process, one model per method, {args.paired_steps} rounds of one "
            "step per method (order rotating); overhead = median over rounds of "
            "(step - none step of the same round)"
        )
        header = (
            f"{'method':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'overhead ms':>11} "
            f"{'quartiles ms':>15} {'vs PEFT':>7}"
        )
        print(header)
        print("-" * len(header))
        for method, s in paired.items():
            q = s.get("overhead_quartiles_s")
            quart = "-" if q is None else f"{q[0] * 1e3:.0f} to {q[1] * 1e3:.0f}"
            overhead = s.get("overhead_s")
            print(
                f"{method:<12} {s['median_s']:>9.3f} {s['min_s']:>7.3f} {s['max_s']:>7.3f} "
                f"{fmt(None if overhead is None else overhead * 1e3, '>11.0f'):>11} "
                f"{quart:>15} {_ratio(s):>7}"
            )
    print()
    for name, ok, detail in checks:
        verdict = "n/a" if ok is None else ("met" if ok else "NOT met")
        print(f"target: {name}: {verdict} -- {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (CPU 5, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (CPU 2, CUDA 5)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--base",
        choices=("float", "nf4", "int8"),
        default="float",
        help="base projections in float, bitsandbytes NF4 (QLoRA) or int8",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument(
        "--paired-steps",
        type=int,
        default=None,
        help="also time N rounds of one step per method in one process (0: off; CPU 8, CUDA 20, "
        "--quick 3); pairs with the none step of the same round cancel slow drift",
    )
    parser.add_argument("--out", default=None, help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="tiny model, smoke test")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.worker:
        result = run_paired_worker(args, methods) if args.worker == "paired" else run_worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return

    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    defaults = (
        QUICK_RUN
        if args.quick
        else {
            "steps": 20 if cuda else 5,
            "warmup": 5 if cuda else 2,
            "repeats": 3,
            "paired_steps": 20 if cuda else 8,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    started = time.perf_counter()
    for round_ in range(args.repeats):
        # Interleaved, and the order rotates each round, so drift and position hit all alike.
        order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
        for method in order:
            result = _run_one(args, method)
            runs[method].append(result)
            med = statistics.median(result["times_s"])
            print(
                f"round {round_ + 1}/{args.repeats} {method:<12} median step {med:.3f} s "
                f"(peak {mib(result['peak_cuda' if cuda else 'peak_rss'])} MiB)",
                flush=True,
            )
    paired_times = None
    paired = None
    if args.paired_steps > 0:
        print(f"paired steps: {args.paired_steps} rounds over {methods} ...", flush=True)
        paired_times = _run_one(args, "paired")["times_s"]
        paired = summarize_paired(paired_times)
    summary = summarize(runs, cuda)
    checks = target_checks(summary, paired, cuda, args.base)
    print_report(args, summary, paired, checks, cuda)
    print(f"\n(wall time {time.perf_counter() - started:.0f} s)")

    if args.out:
        import torch

        import asymlora

        payload = {
            "benchmark": "train",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "arch": platform.machine(),
                "cores": os.cpu_count(),
                "device": args.device,
                "torch": torch.__version__,
                "asymlora": asymlora.__version__,
            },
            "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
            "summary": summary,
            "paired": paired,
            "paired_times_s": paired_times,
            "targets": [{"target": n, "met": ok, "detail": d} for n, ok, d in checks],
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
