"""Data-parallel training of a seed-plus-B adapter.

    torchrun --nproc_per_node 2 examples/train_ddp.py           # DDP
    torchrun --nproc_per_node 2 examples/train_ddp.py --fsdp    # FSDP2 (fully_shard)

Runs on CPU (gloo) or with one CUDA GPU per rank (nccl). Every rank builds the same
tiny Llama from a config (use ``from_pretrained`` in real use) and regenerates the same
frozen ``A`` from the seed; only ``B`` and its gradients are communicated. Rank 0
writes the adapter (``B`` and the seed).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import asymlora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--out", default="adapter.safetensors")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same base weights on every rank
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    lora = asymlora.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=0)
    # Every rank regenerates the same A; wrap checks that they agree (a collective).
    asymlora.wrap(model, lora)

    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        trained = fully_shard(model, mesh=mesh)  # B and the base weights sharded, A not
    else:
        trained = DistributedDataParallel(model)  # all-reduces B's gradients only

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # A toy data set, the same on every rank: 4 global batches of random token ids.
    data = torch.randint(
        0, 256, (4, world * args.batch_per_rank, 32), generator=torch.Generator().manual_seed(1)
    )
    for step in range(args.steps):
        batch = data[step % len(data)]
        x = batch.chunk(world)[rank].to(device)  # this rank's share of the global batch
        loss = trained(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()  # for printing: the global batch's loss
        dist.all_reduce(global_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {global_loss.item() / world:.4f}", flush=True)

    asymlora.save_adapter(model, args.out)  # every rank calls it; rank 0 writes
    if rank == 0:
        adapter = asymlora.read_adapter(args.out)
        print(f"wrote {args.out}: {len(adapter.modules)} modules, seed {adapter.config.seed}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
