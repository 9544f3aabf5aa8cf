"""The ranks of tests/test_distributed.py: DDP, FSDP2 and the Trainer on CPU with gloo.

Each rank runs every phase in turn and writes what it saw under ``out``; the tests
compare that with a single-process run. Kept apart from the test module so spawned
processes import only this (and ``_models``), not pytest's test module.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from _models import LLAMA_TARGETS, tiny_llama
from torch.nn.parallel import DistributedDataParallel

import asymlora
from asymlora.nn import lora_layers
from asymlora.nn.distributed import full_tensor, unwrap_parallel

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 4  # sequences per optimizer step, split evenly over the ranks
SEQ = 12
LR = 1e-2
CONFIG = asymlora.LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS, seed=7)


def batches() -> torch.Tensor:
    """The global batches of every step: STEPS x GLOBAL_BATCH x SEQ token ids."""
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, 128, (STEPS, GLOBAL_BATCH, SEQ), generator=generator)


def shard(batch: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def wrapped_model(**wrap_kwargs) -> torch.nn.Module:
    """The tiny Llama every run starts from, wrapped with CONFIG."""
    model = tiny_llama(seed=0)
    return asymlora.wrap(model, CONFIG, **wrap_kwargs)


def b_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every B, whole (FSDP2 shards are gathered: collective)."""
    return {
        name: full_tensor(layer.lora_B).detach().clone()
        for name, layer in lora_layers(unwrap_parallel(model))
    }


def run(rank: int, port: int, out: str) -> None:
    """Entry point of one rank (torch.multiprocessing.spawn)."""
    out_dir = Path(out)
    torch.set_num_threads(1)  # the single-process reference uses one thread too
    # What torchrun would set; the Hugging Face Trainer (Accelerate) reads it.
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "LOCAL_WORLD_SIZE": WORLD}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _ddp(rank, out_dir)
        _ddp_sends_no_a(rank, out_dir)
        _fsdp(rank, out_dir)
        _mismatch(rank, out_dir)
        _trainer(rank, out_dir)
    except BaseException:
        (out_dir / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _train(model: torch.nn.Module, rank: int) -> torch.Tensor:
    """STEPS optimizer steps on this rank's shard; returns every rank's loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses = torch.zeros(STEPS, WORLD)
    for step, batch in enumerate(batches()):
        x = shard(batch, rank)
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        gathered = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(gathered, loss.detach())
        losses[step] = torch.stack(gathered)
    return losses


def _ddp(rank: int, out: Path) -> None:
    model = wrapped_model()  # check_ranks runs: a process group is up
    ddp = DistributedDataParallel(model)
    losses = _train(ddp, rank)
    torch.save({"losses": losses, "B": b_factors(model)}, out / f"ddp_rank{rank}.pt")
    # Every rank calls save_adapter, each with its own path: only rank 0 writes.
    asymlora.save_adapter(ddp, out / f"ddp_adapter_rank{rank}.safetensors")


def _ddp_sends_no_a(rank: int, out: Path) -> None:
    """Records every tensor DDP broadcasts or all-reduces, with and without asymlora's list."""
    records = {}
    for label in ("asymlora", "control"):
        model = wrapped_model()
        if label == "control":  # what DDP would do without asymlora's ignore list
            model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
        records[label] = _record_ddp_traffic(model, rank)
    torch.save(records, out / f"ddp_probe_rank{rank}.pt")


def _record_ddp_traffic(model: torch.nn.Module, rank: int) -> dict[str, list[str]]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    names = {t.data_ptr(): n for n, t in model.named_parameters()}
    names.update({t.data_ptr(): n for n, t in model.named_buffers()})
    broadcast: list[str] = []
    all_reduced: list[str] = []
    real_broadcast = dist._broadcast_coalesced

    def recording_broadcast(group, tensors, size, src):
        broadcast.extend(names.get(t.data_ptr(), "?") for t in tensors)
        return real_broadcast(group, tensors, size, src)

    def recording_allreduce(state, bucket):
        all_reduced.extend(names[p.data_ptr()] for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    dist._broadcast_coalesced = recording_broadcast  # DDP looks it up at each call
    try:
        ddp = DistributedDataParallel(model)  # broadcasts parameters and buffers
        init_broadcast = list(broadcast)
        broadcast.clear()
        ddp.register_comm_hook(None, recording_allreduce)
        x = shard(batches()[0], rank)
        ddp(x, labels=x).loss.backward()  # forward syncs buffers; backward all-reduces
    finally:
        dist._broadcast_coalesced = real_broadcast
    return {
        "init_broadcast": init_broadcast,
        "forward_broadcast": broadcast,
        "all_reduce": all_reduced,
        "ddp_buffers": sorted(ddp.named_module_buffers),
        "a_buffers": sorted(
            f"{n}.lora_A" for n, layer in lora_layers(model) if "lora_A" in layer._buffers
        ),
        "b_params": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


def _fsdp(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded() -> torch.nn.Module:
        model = wrapped_model()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    model = sharded()
    layers = lora_layers(model)
    kinds = {
        "B_is_dtensor": all(isinstance(layer.lora_B, DTensor) for _, layer in layers),
        "A_is_dtensor": any(isinstance(layer.lora_A, DTensor) for _, layer in layers),
        "base_is_dtensor": all(isinstance(layer.base_layer.weight, DTensor) for _, layer in layers),
        "B_local_rows": {n: layer.lora_B.to_local().shape[0] for n, layer in layers},
    }
    a_before = {n: layer.lora_A.clone() for n, layer in layers}
    losses = _train(model, rank)
    a_after = {n: layer.lora_A for n, layer in lora_layers(model)}
    kinds["A_unchanged"] = all(torch.equal(a_before[n], a_after[n]) for n in a_before)
    kinds["A"] = a_after
    torch.save({"losses": losses, "B": b_factors(model), **kinds}, out / f"fsdp_rank{rank}.pt")
    asymlora.save_adapter(model, out / f"fsdp_adapter_rank{rank}.safetensors")  # collective
    dist.barrier()  # rank 0 has written the file
    # Loading into a sharded model: each rank copies its own rows, nothing is sent.
    fresh = sharded()
    asymlora.load_adapter(fresh, out / "fsdp_adapter_rank0.safetensors")
    torch.save(b_factors(fresh), out / f"fsdp_loaded_rank{rank}.pt")


def _mismatch(rank: int, out: Path) -> None:
    result = {}
    try:  # a seed per rank, as `seed=rank` would give
        asymlora.wrap(tiny_llama(seed=0), dataclasses.replace(CONFIG, seed=rank))
        result["seed"] = None
    except asymlora.DistributedMismatchError as exc:
        result["seed"] = str(exc)
    # Without the check the same mistake goes through (the check is what catches it).
    model = asymlora.wrap(
        tiny_llama(seed=0), dataclasses.replace(CONFIG, seed=rank), check_ranks=False
    )
    result["unchecked_wrapped"] = asymlora.nn.is_wrapped(model)
    # Same config, but one rank's A changed after wrapping: only the bits differ.
    model = wrapped_model()
    if rank == 1:
        _, layer = lora_layers(model)[3]
        layer.lora_A[0, 0] += 1.0
    try:
        asymlora.check_ranks(model)
        result["bits"] = None
    except asymlora.DistributedMismatchError as exc:
        result["bits"] = str(exc)
    result["fingerprint"] = asymlora.adapter_fingerprint(wrapped_model(check_ranks=False))
    torch.save(result, out / f"mismatch_rank{rank}.pt")


def _trainer(rank: int, out: Path) -> None:
    """The Hugging Face Trainer under DDP: checkpoints with adapters, then a resume."""
    import transformers

    ids = torch.randint(0, 128, (16, SEQ), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=LR,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )

    def run(resume: str | None = None) -> transformers.Trainer:
        trainer = transformers.Trainer(
            model=wrapped_model(),
            args=args,
            train_dataset=data,
            callbacks=[asymlora.AsymloraCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    trained = b_factors(full.model)
    wrapped_in = type(full.model_wrapped).__name__
    resumed = run(resume=str(out / "trainer" / "checkpoint-2"))
    result = {
        "wrapped_in": wrapped_in,
        "world_size": args.world_size,
        "B": trained,
        "resumed_B": b_factors(resumed.model),
        "resumed_step": resumed.state.global_step,
    }
    torch.save(result, out / f"trainer_rank{rank}.pt")
