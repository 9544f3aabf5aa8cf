"""Hugging Face Trainer: a wrapped model trains, checkpoints carry seed-plus-B adapters, resume."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
safetensors_torch = pytest.importorskip("safetensors.torch")

from _models import tiny_llama  # noqa: E402

import asymlora  # noqa: E402
from asymlora.nn import lora_layers  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = asymlora.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=3)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def dataset() -> list[dict[str, torch.Tensor]]:
    """16 sequences of 12 token ids, in memory; labels are the inputs (causal LM)."""
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(out: Path, model=None, max_steps: int = 4, **callback_kwargs) -> transformers.Trainer:
    if model is None:
        model = asymlora.wrap(tiny_llama(seed=0), CONFIG)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        callbacks=[asymlora.AsymloraCallback(**callback_kwargs)],
    )


def b_of(model) -> dict[str, torch.Tensor]:
    return {n: layer.lora_B.detach().clone() for n, layer in lora_layers(model)}


def test_checkpoints_hold_adapters_and_resume_matches(tmp_path):
    # Uninterrupted: 4 steps, checkpoints at 2 and 4.
    full = trainer(tmp_path / "full")
    full.train()
    trained = b_of(full.model)
    losses = [log["loss"] for log in full.state.log_history if "loss" in log]
    assert len(losses) == 4

    for step in (2, 4):
        folder = tmp_path / "full" / f"checkpoint-{step}"
        adapter = asymlora.read_adapter(folder / "adapter.safetensors")
        # Seed plus B: no A in the file; A comes back from the seed.
        assert adapter.config.seed == CONFIG.seed
        assert set(adapter.tensors) == {f"{n}.lora_B" for n in trained}
        assert not any(m.a_stored for m in adapter.config.modules.values())
        # It holds the checkpoint's B: the one the Trainer's own model file holds.
        state = safetensors_torch.load_file(folder / "model.safetensors")
        assert not any(k.endswith("lora_A") for k in state)  # A is never saved
        for name in trained:
            assert np.array_equal(adapter.lora_B(name), state[f"{name}.lora_B"].numpy())
    final = asymlora.read_adapter(tmp_path / "full" / "adapter.safetensors")
    for name, b in trained.items():
        assert np.array_equal(final.lora_B(name), b.numpy())
        assert b.abs().max() > 1e-3  # B trained
    checkpoint_4 = tmp_path / "full" / "checkpoint-4" / "adapter.safetensors"
    assert checkpoint_4.read_bytes() == (tmp_path / "full" / "adapter.safetensors").read_bytes()

    # Interrupted at step 2: a fresh wrapped model resumes from checkpoint-2 to step 4.
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, b in b_of(resumed.model).items():
        assert torch.equal(b, trained[name]), name
    resumed_losses = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    assert resumed_losses[-2:] == losses[-2:]

    # The step-2 adapter alone rebuilds the step-2 model on a fresh base.
    fresh = asymlora.load_adapter(
        tiny_llama(seed=0), tmp_path / "full" / "checkpoint-2" / "adapter.safetensors"
    )
    state = safetensors_torch.load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    for name, layer in lora_layers(fresh):
        assert torch.equal(layer.lora_B, state[f"{name}.lora_B"])


def test_callback_options(tmp_path):
    trainer(tmp_path, max_steps=2, filename="seed_plus_b.safetensors", final=False).train()
    assert (tmp_path / "checkpoint-2" / "seed_plus_b.safetensors").is_file()
    assert not (tmp_path / "checkpoint-2" / "adapter.safetensors").exists()
    assert not (tmp_path / "seed_plus_b.safetensors").exists()
    with pytest.raises(ValueError, match="plain file name"):
        asymlora.AsymloraCallback("sub/adapter.safetensors")


def test_callback_refuses_an_unwrapped_model(tmp_path):
    run = trainer(tmp_path, model=tiny_llama(seed=0))
    with pytest.raises(ValueError, match="not wrapped by asymlora"):
        run.train()


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    examples = [b for b in blocks if "AsymloraCallback" in b]
    assert examples, "README has a Trainer example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(examples[0], str(README), "exec"), namespace)
    out = Path(namespace["args"].output_dir)
    assert (out / "adapter.safetensors").is_file()
    checkpoints = sorted(out.glob("checkpoint-*/adapter.safetensors"))
    assert checkpoints, "no checkpoint adapter written"
    assert namespace["resumed"].state.global_step == namespace["args"].max_steps
