"""Training steps of a small Mixtral (MoE experts as 3-D parameters): asymlora train='B'
with ``target_parameters`` vs PEFT LoRA with ``target_parameters`` vs no adapter.

Model: ``MixtralForCausalLM`` built from a config (default hidden 256, 2 layers, 8
experts, top-2, intermediate 512, 8 heads, vocab 2048; seq 128, batch 4), transformers'
default experts implementation, same base weights (``torch.manual_seed``) and batch for
every method; loss with ``labels=input_ids``; AdamW on the trainable parameters. LoRA
r=16, alpha=32 on q, k, v, o and the experts' ``gate_up_proj`` and ``down_proj``.
Methods:

* ``none``: the frozen model, no adapter (forward + backward, no optimizer);
* ``asymlora-B``: ``asymlora.wrap(..., train="B")``, per-expert A frozen orthogonal;
* ``peft-lora``: ``peft.get_peft_model`` with the same r, alpha, targets (A and B trained).

Each method runs in its own fresh subprocess (per-method peak memory); rounds over the
methods are interleaved (``--repeats``) so machine drift hits all alike. Reported:
median step time over all timed steps (min, max), adapter overhead (step minus the
``none`` step) and its ratio to PEFT's, peak memory (CPU: peak RSS growth over the RSS of
the built model; CUDA: ``max_memory_allocated``), trainable parameters.

    bash benches/run.sh moe [--repeats 3] [--steps 6] [--warmup 2]
    python benches/bench_moe.py --quick          # tiny model, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import (
    add_step_arguments,
    current_rss_bytes,
    fmt,
    mib,
    peak_rss_bytes,
    run_worker,
    write_step_result,
)

METHODS = ("none", "asymlora-B", "peft-lora")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
QUICK = {"hidden": 64, "layers": 2, "experts": 4, "intermediate": 96, "seq": 32, "batch": 2}
QUICK_RUN = {"steps": 2, "warmup": 1, "repeats": 1}


def _build(args, torch, device):
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(args.seq, 128),
        use_cache=False,
    )
    return transformers.MixtralForCausalLM(config).to(device).train()


def _add_adapter(method: str, model, args):
    if method == "asymlora-B":
        import asymlora

        cfg = asymlora.LoraConfig(
            r=args.rank,
            alpha=2.0 * args.rank,
            target_modules=ATTENTION,
            target_parameters=EXPERTS,
            train="B",
        )
        return asymlora.wrap(model, cfg)
    if method == "peft-lora":
        import peft

        cfg = peft.LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=ATTENTION,
            target_parameters=EXPERTS,
            lora_dropout=0.0,
        )
        return peft.get_peft_model(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _worker(method: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(args, torch, device)
    model = _add_adapter(method, model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    ).to(device)
    cuda = device.type == "cuda"
    built_rss = current_rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        built_cuda = torch.cuda.memory_allocated()
    embed = model.get_input_embeddings()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        # embeddings that require grad: backward runs through every layer for every
        # method (as in LoRA training), so the methods differ only by the adapter
        x = embed(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() - built_cuda
        if cuda
        else peak_rss_bytes() - (built_rss or 0)
    )
    return {
        "method": method,
        "times": times,
        "peak_growth_bytes": peak,
        "trainable_params": sum(p.numel() for p in trainable),
        "loss": float(loss),
    }


def _run_worker(method: str, args) -> dict:
    return run_worker(__file__, method, _forwarded(args))


def _forwarded(args) -> list[str]:
    keys = ("hidden", "layers", "experts", "intermediate", "seq", "batch", "vocab", "rank")
    keys += ("steps", "warmup", "threads", "device")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def _summary(runs: list[dict]) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in {r["method"] for r in runs}}
    out = {}
    for method, rows in by.items():
        times = [t for r in rows for t in r["times"]]
        out[method] = {
            "step_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "peak_growth_bytes": statistics.median(r["peak_growth_bytes"] for r in rows),
            "trainable_params": rows[0]["trainable_params"],
        }
    base = out.get("none", {}).get("step_s")
    for row in out.values():
        row["overhead_s"] = None if base is None else row["step_s"] - base
    return out


def _print(summary: dict, args) -> None:
    print(
        f"Mixtral hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
        f"intermediate {args.intermediate}, seq {args.seq}, batch {args.batch}, r {args.rank}; "
        f"{args.device}, {args.threads} threads"
    )
    header = f"{'method':<12} {'step ms':>9} {'(min-max)':>15} {'overhead ms':>12}"
    print(f"{header} {'peak MiB':>9} {'trainable':>10}")
    for method in METHODS:
        row = summary.get(method)
        if row is None:
            continue
        span = f"{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}"
        print(
            f"{method:<12} {row['step_s'] * 1e3:>9.1f} {span:>15} "
            f"{fmt(None if row['overhead_s'] is None else row['overhead_s'] * 1e3, '.1f'):>12} "
            f"{mib(row['peak_growth_bytes']):>9} {row['trainable_params']:>10,}"
        )
    ours, theirs = summary.get("asymlora-B"), summary.get("peft-lora")
    if ours and theirs and ours["overhead_s"] is not None and theirs["overhead_s"]:
        ratio = ours["overhead_s"] / theirs["overhead_s"]
        print(f"asymlora-B overhead / PEFT overhead: {ratio:.2f}")
        mem = ours["peak_growth_bytes"] / max(theirs["peak_growth_bytes"], 1)
        print(f"asymlora-B peak / PEFT peak: {mem:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    add_step_arguments(parser, METHODS)
    args = parser.parse_args()
    if args.quick:
        for key, value in {**QUICK, **QUICK_RUN}.items():
            setattr(args, key, value)
        args.vocab = 256
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    runs = []
    for round_ in range(args.repeats):  # interleaved: every round runs every method
        order = methods if round_ % 2 == 0 else methods[::-1]
        runs += [_run_worker(m, args) for m in order]
    summary = _summary(runs)
    _print(summary, args)
    write_step_result(args, summary=summary)


if __name__ == "__main__":
    main()
