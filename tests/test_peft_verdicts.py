"""One PEFT reader: every PEFT directory gets the same verdict from ``import_peft``,
``merge_files``, ``asymlora merge`` and ``asymlora import-peft``.

A table of PEFT LoRA directories, good and bad, made from a real ``PeftModel`` save of a
tiny Llama and edited one way each, goes through all four. A good directory must be
accepted by all; a bad one refused by all with the same exception class (Python) and
the same one-line message (CLI: ``asymlora: error: <message>``, exit code 1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from _models import tiny_llama  # noqa: E402

import asymlora  # noqa: E402

WEIGHTS = "adapter_model.safetensors"
DORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
EMBED_KEY = "base_model.model.model.embed_tokens.lora_embedding_A"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model.safetensors, PEFT adapter directory) of a tiny Llama."""
    root = tmp_path_factory.mktemp("verdicts")
    model = tiny_llama(seed=0)
    base = root / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.norm.num_batches_tracked"] = torch.tensor(0)  # for the integer-buffer case
    safetensors_torch.save_file(state, str(base))
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(root / "peft"))
    return base, root / "peft"


# --------------------------------------------------------------------------- edits


def _config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        config.update(changes)
        (d / CONFIG).write_text(json.dumps(config))

    return edit


def _tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tensors = safetensors_torch.load_file(str(d / WEIGHTS))
        change(tensors)
        safetensors_torch.save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})

    return edit


def _first(t: dict, suffix: str) -> str:
    return next(k for k in sorted(t) if k.endswith(suffix))


def _quantise_b(t: dict) -> None:
    key = _first(t, "lora_B.weight")
    t[key] = (t[key] * 100).to(torch.int8)


def _conv_a(t: dict) -> None:
    key = _first(t, "lora_A.weight")
    t[key] = t[key][:, :, None, None].contiguous()


def _drop_b(t: dict) -> None:
    del t[_first(t, "lora_B.weight")]


def _norm_with_counter(d: Path) -> None:
    _config(modules_to_save=["norm"])(d)

    def add(t: dict) -> None:
        t["base_model.model.model.norm.weight"] = torch.linspace(0.5, 1.5, 64)
        t["base_model.model.model.norm.num_batches_tracked"] = torch.tensor(3)

    _tensors(add)(d)


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS).rename(d / "adapter_model.bin")


def _nest(d: Path) -> None:
    inner = d / "mine"
    inner.mkdir()
    for name in (CONFIG, WEIGHTS):
        (d / name).rename(inner / name)


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[:-10])


def _bad_json(d: Path) -> None:
    (d / CONFIG).write_text("{not json")


GOOD: dict[str, Callable[[Path], None]] = {
    "plain": lambda d: None,
    "rslora-and-patterns": _config(
        use_rslora=True, lora_alpha=8, alpha_pattern={"v_proj": 2}, rank_pattern={"q_proj": 2}
    ),
    "megatron-null": _config(megatron_config=None),
    "modules-to-save-with-integer-buffer": _norm_with_counter,
}

BAD: dict[str, Callable[[Path], None]] = {
    "megatron": _config(megatron_config={"tensor_model_parallel_size": 2}),
    "dora-config": _config(use_dora=True),
    "other-method": _config(peft_type="IA3"),
    "bias-all": _config(bias="all"),
    "lora-bias": _config(lora_bias=True),
    "rank-mismatch": _config(r=3),
    "rank-pattern-not-integer": _config(rank_pattern={"q_proj": 2.5}),
    "pattern-not-a-regex": _config(rank_pattern={"(?=q)proj": 2}),
    "rslora-not-bool": _config(use_rslora="yes"),
    "dora-tensor": _tensors(lambda t: t.update({DORA_KEY: torch.ones(64)})),
    "embedding-lora": _tensors(lambda t: t.update({EMBED_KEY: torch.ones(2, 128)})),
    "quantised-factor": _tensors(_quantise_b),
    "conv-factor": _tensors(_conv_a),
    "missing-factor": _tensors(_drop_b),
    "unrecognised-tensor": _tensors(
        lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)})
    ),
    "pickle-only": _pickle_only,
    "nested-adapter": _nest,
    "truncated-weights": _truncate,
    "config-not-json": _bad_json,
}


# --------------------------------------------------------------------------- verdicts


def _python_verdict(call: Callable[[], object]) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as exc:  # the verdict is the exception itself
        return type(exc).__name__, str(exc)
    return "ok", ""


def _cli_verdict(args: list[object]) -> tuple[int, str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def _verdicts(cli: Path, base: Path, adapter: Path, work: Path) -> dict[str, tuple]:
    return {
        "import_peft": _python_verdict(
            lambda: asymlora.import_peft(adapter, work / "imported.safetensors")
        ),
        "merge_files": _python_verdict(
            lambda: asymlora.merge_files(base, adapter, work / "merged.safetensors")
        ),
        "cli merge": _cli_verdict([cli, "merge", base, adapter, "-o", work / "cli.safetensors"]),
        "cli import-peft": _cli_verdict(
            [cli, "import-peft", adapter, "-o", work / "cli-imported.safetensors"]
        ),
    }


def _copy(saved: tuple[Path, Path], tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(saved[1], d)
    edit(d)
    return d


@pytest.mark.parametrize("case", list(GOOD))
def test_good_directories_are_accepted_everywhere(saved, tmp_path, cli_path, case):
    adapter = _copy(saved, tmp_path, GOOD[case])
    v = _verdicts(cli_path, saved[0], adapter, tmp_path)
    assert v["import_peft"] == ("ok", "") and v["merge_files"] == ("ok", ""), v
    assert v["cli merge"][0] == 0 and v["cli import-peft"][0] == 0, v
    # The files the two front ends wrote are the same bytes.
    for python_out, cli_out in (("imported", "cli-imported"), ("merged", "cli")):
        a = (tmp_path / f"{python_out}.safetensors").read_bytes()
        assert a == (tmp_path / f"{cli_out}.safetensors").read_bytes(), python_out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_directories_get_one_verdict(saved, tmp_path, cli_path, case):
    adapter = _copy(saved, tmp_path, BAD[case])
    v = _verdicts(cli_path, saved[0], adapter, tmp_path)
    kind, message = v["import_peft"]
    assert kind == "AdapterFormatError", v
    assert v["merge_files"] == (kind, message), v
    one_line = f"asymlora: error: {message}\n"
    assert v["cli merge"] == (1, one_line), v
    assert v["cli import-peft"] == (1, one_line), v
    assert isinstance(asymlora.AdapterFormatError("x"), (asymlora.AsymloraError, ValueError))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "adapter"], "nothing written"


def test_missing_directory_is_file_not_found_everywhere(saved, tmp_path, cli_path):
    v = _verdicts(cli_path, saved[0], tmp_path / "nope", tmp_path)
    assert v["import_peft"][0] == "FileNotFoundError", v
    assert v["merge_files"] == v["import_peft"], v
    assert v["cli merge"] == (1, f"asymlora: error: {v['import_peft'][1]}\n"), v
    assert v["cli import-peft"] == v["cli merge"], v
