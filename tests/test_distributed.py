"""DDP and FSDP2 on CPU (gloo, 2 spawned ranks) against a single-process run on the same batches.

One spawn runs every phase (tests/_distributed_worker.py); the tests below read what
the ranks wrote. The single-process reference runs here, one thread like the ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _distributed_worker as worker  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import asymlora  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the two ranks once; returns the folder they wrote to."""
    out = tmp_path_factory.mktemp("ranks")
    start = time.perf_counter()
    mp.spawn(worker.run, args=(_free_port(), str(out)), nprocs=worker.WORLD, join=True)
    print(f"2 ranks, all phases: {time.perf_counter() - start:.1f} s")
    return out


class _OneThread:
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _reference(per_rank: bool, tmp_path, name: str):
    """One process, the same global batches; returns (loss per step, B, adapter path).

    ``per_rank``: each step runs the ranks' halves one after the other and averages
    the two accumulated gradients, which is exactly what the gradient all-reduce of
    2 ranks computes ((g0 + g1) / 2, with both additions commutative and the halving
    exact). Otherwise one forward over the whole global batch, as one would train on
    one machine: the same maths, other rounding.
    """
    with _OneThread():
        model = worker.wrapped_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=worker.LR)
        losses = []
        for batch in worker.batches():
            if per_rank:
                step_losses = []
                for rank in range(worker.WORLD):
                    x = worker.shard(batch, rank)
                    loss = model(x, labels=x).loss
                    loss.backward()
                    step_losses.append(loss.detach())
                for p in params:
                    p.grad.div_(worker.WORLD)
                losses.append(torch.stack(step_losses).mean())
            else:
                loss = model(batch, labels=batch).loss
                loss.backward()
                losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
        path = tmp_path / f"{name}.safetensors"
        asymlora.save_adapter(model, path)
    b = {n: layer.lora_B.detach().clone() for n, layer in lora_layers(model)}
    return torch.stack(losses), b, path


@pytest.fixture(scope="module")
def exact_reference(tmp_path_factory):
    return _reference(True, tmp_path_factory.mktemp("exact"), "single_process_per_rank")


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory):
    return _reference(False, tmp_path_factory.mktemp("plain"), "single_process")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_matches_single_process_training(ranks, kind, exact_reference, plain_reference):
    runs = [torch.load(ranks / f"{kind}_rank{r}.pt", weights_only=False) for r in range(2)]
    # Both ranks saw both ranks' losses and end with the same (whole) B.
    assert torch.equal(runs[0]["losses"], runs[1]["losses"])
    assert runs[0]["B"].keys() == runs[1]["B"].keys()
    for name in runs[0]["B"]:
        assert torch.equal(runs[0]["B"][name], runs[1]["B"][name]), name
    losses = runs[0]["losses"].mean(dim=1)  # the global batch's loss per step
    b = runs[0]["B"]
    assert len(losses) == worker.STEPS and losses[-1] < losses[0]  # it trained

    # The whole global batch in one process: same curve and B within float tolerance.
    plain_losses, plain_b, _ = plain_reference
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    for name, value in plain_b.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-6)
        assert value.abs().max() > 1e-3  # B moved away from zero

    # The same halves in one process, gradients averaged: identical to the bit.
    exact_losses, exact_b, _ = exact_reference
    assert torch.equal(losses, exact_losses)
    for name, value in exact_b.items():
        assert torch.equal(b[name], value), name


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_adapter_written_once_and_identical(ranks, kind, exact_reference, plain_reference):
    # Every rank called save_adapter with its own path; only rank 0 wrote.
    written = ranks / f"{kind}_adapter_rank0.safetensors"
    assert written.is_file()
    assert not (ranks / f"{kind}_adapter_rank1.safetensors").exists()
    # Byte for byte the single-process file (B gathered from the FSDP2 shards).
    _, _, exact_path = exact_reference
    assert written.read_bytes() == exact_path.read_bytes()
    adapter = asymlora.read_adapter(written)
    assert set(adapter.tensors) == {f"{n}.lora_B" for n in adapter.modules}  # B only
    assert adapter.config.seed == worker.CONFIG.seed
    # The plainly trained model's adapter holds the same B within tolerance.
    plain = asymlora.read_adapter(plain_reference[2])
    for name in adapter.modules:
        np.testing.assert_allclose(adapter.lora_B(name), plain.lora_B(name), rtol=1e-4, atol=1e-6)


def test_ddp_sends_b_gradients_and_nothing_about_a(ranks):
    for rank in range(2):
        probe = torch.load(ranks / f"ddp_probe_rank{rank}.pt", weights_only=False)
        ours, control = probe["asymlora"], probe["control"]
        a_names = set(ours["a_buffers"])
        assert len(a_names) == 2 * len(worker.LLAMA_TARGETS)
        # The recording sees DDP's traffic: without asymlora's list DDP sends every A
        # when it is built and again before each forward.
        assert a_names <= set(control["init_broadcast"])
        assert a_names <= set(control["forward_broadcast"])
        # With it, no A is broadcast, at construction or in forward, nor kept for syncing.
        assert not a_names & set(ours["init_broadcast"])
        assert not a_names & set(ours["forward_broadcast"])
        assert not a_names & set(ours["ddp_buffers"])
        assert "?" not in ours["init_broadcast"] + ours["forward_broadcast"]
        # Other buffers (the rotary frequencies) are still DDP's to sync.
        assert ours["forward_broadcast"]
        # Gradients: exactly the B parameters are all-reduced, each once.
        assert sorted(ours["all_reduce"]) == ours["b_params"]
        assert all(n.endswith(".lora_B") for n in ours["b_params"])


def test_fsdp2_shards_b_and_keeps_a_a_plain_buffer(ranks):
    for rank in range(2):
        run = torch.load(ranks / f"fsdp_rank{rank}.pt", weights_only=False)
        assert run["B_is_dtensor"] and run["base_is_dtensor"]
        assert not run["A_is_dtensor"] and run["A_unchanged"]
        # Each rank holds half of every B's rows.
        assert run["B_local_rows"] == {n: b.shape[0] // 2 for n, b in run["B"].items()}
        # A is the generator's, bit for bit, on every rank.
        expected = asymlora.random_orthogonal_many(
            [(a.shape[0], a.shape[1]) for a in run["A"].values()],
            seed=worker.CONFIG.seed,
            streams=list(range(len(run["A"]))),
        )
        for a, e in zip(run["A"].values(), expected):
            assert np.array_equal(a.numpy(), e)


def test_fsdp2_load_adapter_into_sharded_model(ranks):
    saved = asymlora.read_adapter(ranks / "fsdp_adapter_rank0.safetensors")
    for rank in range(2):
        loaded = torch.load(ranks / f"fsdp_loaded_rank{rank}.pt", weights_only=False)
        assert loaded.keys() == set(saved.modules)
        for name, b in loaded.items():
            assert np.array_equal(b.numpy(), saved.lora_B(name)), name
            assert b.abs().max() > 0


def test_wrap_refuses_a_different_seed_per_rank(ranks):
    results = [torch.load(ranks / f"mismatch_rank{r}.pt", weights_only=False) for r in range(2)]
    for result in results:
        message = result["seed"]
        assert message is not None, "wrap accepted a different seed on each rank"
        assert "rank 0: fingerprint" in message and "rank 1: fingerprint" in message
        assert "seed 1 != 0" in message and "LoraConfig.seed" in message
        assert result["unchecked_wrapped"]  # check_ranks=False lets it through
    assert results[0]["seed"] == results[1]["seed"]  # the same error on every rank


def test_check_ranks_sees_changed_bits(ranks):
    results = [torch.load(ranks / f"mismatch_rank{r}.pt", weights_only=False) for r in range(2)]
    name = lora_layers(worker.wrapped_model())[3][0]
    for result in results:
        message = result["bits"]
        assert message is not None, "check_ranks missed an A changed on rank 1"
        assert f"{name}: the frozen factor differs bit-wise" in message
    # Fingerprints do not depend on the process: the ranks' equal this one's.
    here = asymlora.adapter_fingerprint(worker.wrapped_model())
    assert results[0]["fingerprint"] == results[1]["fingerprint"] == here


def test_trainer_under_ddp_checkpoints_adapters_and_resumes(ranks):
    runs = [torch.load(ranks / f"trainer_rank{r}.pt", weights_only=False) for r in range(2)]
    for run in runs:
        assert run["wrapped_in"] == "DistributedDataParallel" and run["world_size"] == 2
        assert run["resumed_step"] == 4
        for name, b in run["B"].items():
            assert torch.equal(b, runs[0]["B"][name])  # the ranks agree
            assert torch.equal(run["resumed_B"][name], b)  # resuming changes nothing
    for step in (2, 4):
        adapter = asymlora.read_adapter(
            ranks / "trainer" / f"checkpoint-{step}" / "adapter.safetensors"
        )
        assert set(adapter.tensors) == {f"{n}.lora_B" for n in runs[0]["B"]}
    final = asymlora.read_adapter(ranks / "trainer" / "adapter.safetensors")
    for name, b in runs[0]["B"].items():
        assert np.array_equal(final.lora_B(name), b.numpy())
        assert b.abs().max() > 1e-3


def test_fingerprint_covers_seed_config_and_bits():
    model = worker.wrapped_model()
    base = asymlora.adapter_fingerprint(model)
    assert asymlora.adapter_fingerprint(worker.wrapped_model()) == base
    import dataclasses

    other_seed = asymlora.wrap(
        worker.tiny_llama(seed=0), dataclasses.replace(worker.CONFIG, seed=8)
    )
    assert asymlora.adapter_fingerprint(other_seed) != base
    other_alpha = asymlora.wrap(
        worker.tiny_llama(seed=0), dataclasses.replace(worker.CONFIG, alpha=4)
    )
    assert asymlora.adapter_fingerprint(other_alpha) != base
    _, layer = lora_layers(model)[0]
    layer.lora_A[1, 2] = torch.nextafter(layer.lora_A[1, 2], torch.tensor(2.0))  # one ulp
    assert asymlora.adapter_fingerprint(model) != base
    # Trained B is not part of it: training does not change the fingerprint.
    model2 = worker.wrapped_model()
    with torch.no_grad():
        lora_layers(model2)[0][1].lora_B.fill_(1.0)
    assert asymlora.adapter_fingerprint(model2) == base


def test_ddp_ignore_list_follows_wrap_load_and_unwrap(tmp_path):
    model = worker.tiny_llama(seed=0)
    model._ddp_params_and_buffers_to_ignore = ["lm_head.weight"]  # the user's own entry
    asymlora.wrap(model, worker.CONFIG)
    a_names = {f"{n}.lora_A" for n, _ in lora_layers(model)}
    assert set(model._ddp_params_and_buffers_to_ignore) == a_names | {"lm_head.weight"}
    asymlora.save_adapter(model, tmp_path / "a.safetensors")
    asymlora.unwrap(model, merge=False)
    assert model._ddp_params_and_buffers_to_ignore == ["lm_head.weight"]
    fresh = worker.tiny_llama(seed=0)
    asymlora.load_adapter(fresh, tmp_path / "a.safetensors", is_trainable=True)
    assert set(fresh._ddp_params_and_buffers_to_ignore) == a_names
    asymlora.unwrap(fresh)
    assert not hasattr(fresh, "_ddp_params_and_buffers_to_ignore")


def test_check_ranks_without_a_process_group():
    assert not dist.is_initialized()
    model = worker.wrapped_model(check_ranks=None)  # no group: no check, no error
    with pytest.raises(RuntimeError, match="init_process_group"):
        asymlora.check_ranks(model)
    with pytest.raises(RuntimeError, match="check_ranks=True"):
        worker.wrapped_model(check_ranks=True)


def test_torchrun_example(tmp_path):
    """README's `torchrun --nproc_per_node 2 examples/train_ddp.py` runs (DDP on CPU)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
    out = tmp_path / "adapter.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(example), "--steps", "3", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "step   2  loss" in result.stdout
    adapter = asymlora.read_adapter(out)
    assert len(adapter.modules) == 4 and adapter.config.seed == 0
    assert all(np.abs(adapter.lora_B(n)).max() > 0 for n in adapter.modules)
