"""What the frozen A saves on convolutions and embeddings: asymlora train='B' vs PEFT LoRA
on the same layers vs no adapter.

Rows (same base weights from ``torch.manual_seed(0)``, same batch for every method):

* ``conv2d``: a UNet-like stack of 4 ``nn.Conv2d`` 64->64 3x3 (padding 1, SiLU between),
  input 8 x 64 x 32 x 32; ``conv1d``: 2 ``nn.Conv1d`` 128->128 k3, input 8 x 128 x 1024;
  ``conv3d``: 2 ``nn.Conv3d`` 32->32 3x3x3, input 2 x 32 x 8 x 16 x 16; every conv
  adapted, with adapter dropout 0.0 and 0.1; the input requires grad (as in a middle
  block: backward runs through every layer for every method);
* ``embedding``: ``nn.Embedding(32000, 1024)`` then a frozen ``nn.Linear(1024, 256)``
  head, ids 8 x 512, the embedding adapted (dropout does not apply to token ids). The
  ``none`` step has nothing to differentiate: it is a forward only.

LoRA r=16, alpha=32; loss ``mean(out**2)``; AdamW on the trainable parameters. Methods:
``none`` (frozen), ``asymlora-B`` (``asymlora.wrap(..., train="B")``, A frozen orthogonal
from the seed), ``peft-lora`` (``peft.get_peft_model``, A and B trained). Each method runs
in its own fresh subprocess (all rows in it); rounds over the methods are interleaved
(``--repeats``). Reported per row and method: bytes autograd saves for backward over one
forward, weights and the input excluded (``tests/_measure.py``), trainable parameters,
AdamW state (2 x trainable x 4 bytes), adapter file bytes (``asymlora.save_adapter`` vs
PEFT's ``adapter_model.safetensors``), median step time (forward + backward + AdamW step)
and its overhead over ``none``; then the ratios asymlora-B / PEFT.

    bash benches/run.sh layer_kinds [--repeats 3] [--steps 6] [--warmup 2]
    python benches/bench_layer_kinds.py --quick          # tiny sizes, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_step_arguments, fmt, mib, run_worker, write_step_result

METHODS = ("none", "asymlora-B", "peft-lora")
DROPOUTS = (0.0, 0.1)
# conv rows: (dims, layers, channels, (batch, *spatial))
# the embedding: (vocab, dim, head, (batch, seq))
CONVS = {
    "conv2d": (2, 4, 64, (8, 32, 32)),
    "conv1d": (1, 2, 128, (8, 1024)),
    "conv3d": (3, 2, 32, (2, 8, 16, 16)),
}
EMBEDDING = (32000, 1024, 256, (8, 512))
QUICK_CONVS = {"conv2d": (2, 2, 16, (2, 8, 8)), "conv1d": (1, 2, 16, (2, 16))}
QUICK_CONVS["conv3d"] = (3, 2, 16, (1, 4, 4, 4))  # channels >= r: asymlora needs r <= d_out
QUICK_EMBEDDING = (512, 32, 8, (2, 16))
QUICK_RUN = {"steps": 2, "warmup": 1, "repeats": 1}
Case = dict[str, Any]


def _rows(quick: bool) -> dict[str, tuple]:
    return {
        **(QUICK_CONVS if quick else CONVS),
        "embedding": QUICK_EMBEDDING if quick else EMBEDDING,
    }


def _build(row: str, spec: tuple, torch, device):
    """The frozen base of a row, its adapted module names and its input batch."""
    nn = torch.nn
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if row == "embedding":
        vocab, dim, head, shape = spec
        model = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, head))
        x = torch.randint(0, vocab, shape, generator=gen)
    else:
        dims, layers, channels, (batch, *spatial) = spec
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        mods: list = []
        for i in range(layers):
            mods += [nn.SiLU()] if i else []
            mods += [conv(channels, channels, 3, padding=1)]
        model = nn.Sequential(*mods)
        x = torch.randn(batch, channels, *spatial, generator=gen)
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.to(device)
    return model.to(device).train(), targets, x.requires_grad_(row != "embedding")


def _add_adapter(method: str, model, targets: list[str], dropout: float, rank: int):
    if method == "asymlora-B":
        import asymlora

        cfg = asymlora.LoraConfig(
            r=rank, alpha=2.0 * rank, target_modules=targets, train="B", dropout=dropout
        )
        return asymlora.wrap(model, cfg)
    if method == "peft-lora":
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=dropout
        )
        return peft.get_peft_model(model, config)
    return model


def _adapter_bytes(method: str, model) -> int | None:
    if method == "none":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if method == "asymlora-B":
            import asymlora

            path = Path(tmp) / "adapter.safetensors"
            asymlora.save_adapter(model, path)
        else:
            model.save_pretrained(tmp)
            path = Path(tmp) / "adapter_model.safetensors"
        return path.stat().st_size


def _case(method: str, row: str, spec: tuple, dropout: float | None, args, torch) -> Case:
    from _measure import saved_activation_bytes  # tests/, put on sys.path by _worker

    device = torch.device(args.device)
    model, targets, x = _build(row, spec, torch, device)
    model = _add_adapter(method, model, targets, dropout or 0.0, args.rank)
    saved, _ = saved_activation_bytes(model, x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    cuda = device.type == "cuda"
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(x).float().pow(2).mean()
        if loss.requires_grad:
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    n = sum(p.numel() for p in trainable)
    return {
        "row": row,
        "dropout": dropout,
        "method": method,
        "times": times,
        "saved_bytes": saved,
        "trainable_params": n,
        "optimizer_bytes": 2 * n * 4,
        "file_bytes": _adapter_bytes(method, model),
    }


def _worker(method: str, args) -> list[Case]:
    import torch

    torch.set_num_threads(args.threads)
    # the saved-bytes counter the torch tests use: tests/_measure.py (benches/ is sys.path[0])
    sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
    cases = []
    for row, spec in _rows(args.quick).items():
        dropouts = [None] if method == "none" else [0.0] if row == "embedding" else DROPOUTS
        cases += [_case(method, row, spec, p, args, torch) for p in dropouts]
    return cases


def _run_worker(method: str, args) -> list[Case]:
    keys = ("rank", "steps", "warmup", "threads", "device")
    options = [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]
    return run_worker(__file__, method, options + (["--quick"] if args.quick else []))


def _summary(runs: list[Case]) -> list[Case]:
    by: dict[tuple, list[Case]] = {}
    for r in runs:
        by.setdefault((r["row"], r["dropout"], r["method"]), []).append(r)
    out = []
    for rows in by.values():
        times = [t for r in rows for t in r["times"]]
        row = {k: v for k, v in rows[0].items() if k != "times"}
        out.append(row | {"step_s": statistics.median(times), "min_s": min(times)})
        out[-1]["max_s"] = max(times)
    base = {r["row"]: r["step_s"] for r in out if r["method"] == "none"}
    for r in out:
        r["overhead_s"] = r["step_s"] - base[r["row"]] if r["row"] in base else None
    place = {r: i for i, r in enumerate(dict.fromkeys(r["row"] for r in out))}
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda r: (place[r["row"]], r["dropout"] or 0.0, order[r["method"]]))


def _ratios(summary: list[Case]) -> list[Case]:
    keys = ("saved_bytes", "trainable_params", "file_bytes", "step_s", "overhead_s")
    find = {(r["row"], r["dropout"], r["method"]): r for r in summary}
    out = []
    for (row, dropout, method), ours in find.items():
        theirs = find.get((row, dropout, "peft-lora"))
        if method != "asymlora-B" or theirs is None:
            continue
        ratio = {
            k: ours[k] / theirs[k] if ours[k] is not None and theirs[k] else None for k in keys
        }
        out.append({"row": row, "dropout": dropout, **ratio})
    return out


def _print(summary: list[Case], ratios: list[Case], args) -> None:
    sizes = {r: "x".join(map(str, s[-1])) for r, s in _rows(args.quick).items()}
    print(
        f"r {args.rank}, alpha {2 * args.rank}; inputs "
        + ", ".join(f"{r} {s}" for r, s in sizes.items())
        + f"; {args.device}, {args.threads} threads"
    )
    header = f"{'row':<10} {'dropout':>7} {'method':<11} {'saved MiB':>9} {'trainable':>10}"
    print(f"{header} {'AdamW MiB':>9} {'file KiB':>9} {'step ms':>9} {'overhead ms':>11}")
    for r in summary:
        print(
            f"{r['row']:<10} {fmt(r['dropout'], '.1f'):>7} {r['method']:<11} "
            f"{mib(r['saved_bytes'], 2):>9} {r['trainable_params']:>10,} "
            f"{mib(r['optimizer_bytes'], 2):>9} "
            f"{fmt(None if r['file_bytes'] is None else r['file_bytes'] / 1024, '.1f'):>9} "
            f"{r['step_s'] * 1e3:>9.1f} "
            f"{fmt(None if r['overhead_s'] is None else r['overhead_s'] * 1e3, '.1f'):>11}"
        )
    print("asymlora-B / PEFT:")
    header = f"{'row':<10} {'dropout':>7} {'saved':>6} {'trainable':>9} {'file':>6}"
    print(f"{header} {'step':>6} {'overhead':>8}")
    for r in ratios:
        print(
            f"{r['row']:<10} {r['dropout']:>7.1f} {fmt(r['saved_bytes'], '.2f'):>6} "
            f"{fmt(r['trainable_params'], '.3f'):>9} {fmt(r['file_bytes'], '.3f'):>6} "
            f"{fmt(r['step_s'], '.2f'):>6} {fmt(r['overhead_s'], '.2f'):>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, METHODS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        for key, value in QUICK_RUN.items():
            setattr(args, key, value)
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    runs = []
    for round_ in range(args.repeats):  # interleaved: every round runs every method
        order = methods if round_ % 2 == 0 else methods[::-1]
        runs += [case for m in order for case in _run_worker(m, args)]
    summary = _summary(runs)
    ratios = _ratios(summary)
    _print(summary, ratios, args)
    write_step_result(args, summary=summary, ratios=ratios)


if __name__ == "__main__":
    main()
