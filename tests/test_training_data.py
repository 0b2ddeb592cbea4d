"""Data pipeline: EOS-joined stream without padding, windows, determinism, the token cache,
document sources (text, folders, JSONL, manifest) and the BPE trainer."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from newllm.tokenizer import Tokenizer
from training import data as D

WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()


def make_docs(n: int, seed: int = 0, words: int = 40) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))))
            for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level()


def test_stream_is_documents_joined_by_eos(tok):
    docs = make_docs(12)
    stream = D.tokenize_documents(docs, tok)
    expected = [t for _, text in docs for t in tok.encode(text) + [tok.eos_token_id]]
    assert stream.tokens.tolist() == expected
    assert int((stream.tokens == tok.eos_token_id).sum()) == len(docs)
    for i, (_, text) in enumerate(docs):
        assert stream.document(i).tolist() == tok.encode(text)
        assert stream.tokens[stream.starts[i + 1] - 1] == tok.eos_token_id


def test_windows_tile_the_stream_without_padding(tok):
    stream = D.tokenize_documents(make_docs(30), tok)
    L = 17
    w = D.Windows(stream.tokens, L)
    assert len(w) == (len(stream) - 1) // L
    rebuilt = []
    for i in range(len(w)):
        x = w[i]
        assert x.shape == (L + 1,) and x.dtype == torch.int64
        assert x.tolist() == stream.tokens[i * L:i * L + L + 1].tolist()  # a true slice
        rebuilt.extend(x[:-1].tolist())
    assert rebuilt == stream.tokens[:len(w) * L].tolist()
    # every EOS in the windows is a document end, never filler
    n_eos = sum(int((w[i][:-1] == 0).sum()) for i in range(len(w)))
    assert n_eos == int((stream.tokens[:len(w) * L] == 0).sum())
    with pytest.raises(IndexError):
        w[len(w)]


def test_batches_are_deterministic_and_ranks_disjoint():
    a = [D.batch_indices(50, 4, s, seed=42) for s in range(30)]
    b = [D.batch_indices(50, 4, s, seed=42) for s in range(30)]
    c = [D.batch_indices(50, 4, s, seed=7) for s in range(30)]
    assert a == b and a != c
    epoch0 = [i for batch in a[:12] for i in batch]  # 12 steps of 4 from 50 windows
    assert len(set(epoch0)) == 48
    r0 = D.batch_indices(50, 4, 3, seed=42, rank=0, world_size=2)
    r1 = D.batch_indices(50, 4, 3, seed=42, rank=1, world_size=2)
    assert not set(r0) & set(r1)
    with pytest.raises(ValueError, match="batch-size"):
        D.batch_indices(3, 4, 0)


def test_split_is_by_document_and_seeded(tok):
    stream = D.tokenize_documents(make_docs(40), tok)
    train, val = D.split_train_val(stream, 0.1, seed=42)
    assert val.num_documents == 4 and train.num_documents == 36
    assert set(train.names).isdisjoint(val.names)
    assert sorted(train.names + val.names) == sorted(stream.names)
    assert len(train) + len(val) == len(stream)
    again = D.split_train_val(stream, 0.1, seed=42)[1]
    other = D.split_train_val(stream, 0.1, seed=1)[1]
    assert again.names == val.names and other.names != val.names
    one = D.tokenize_documents(make_docs(1, words=200), tok)
    t1, v1 = D.split_train_val(one, 0.25)
    assert np.concatenate((t1.tokens, v1.tokens)).tolist() == one.tokens.tolist()


def test_sources_txt_folder_jsonl_manifest(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub" / "b.md").write_text("second file")
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"prompt": "Q", "completion": " A"})
        + "\n")
    docs = D.read_documents([tmp_path])
    assert [t for _, t in docs] == ["first file", "second file", "json doc", "Q A"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        D.read_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError):
        D.read_documents([tmp_path / "missing.txt"])
    # a manifest splits a concatenated file into its books
    books = ["Book one.\nTHE END\n", "Book two\n\nhas\n\n\nthree breaks.\n", "Book three.\n"]
    g = tmp_path / "g"
    g.mkdir()
    (g / "train.txt").write_text("\n\n".join(books))
    rows = ["name\tsplit\tclean_bytes"] + [f"b{i}\ttrain\t{len(b) - 1}" for i, b in
                                           enumerate(books)]
    (g / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    got = D.read_documents([g / "train.txt"])
    assert [t.rstrip("\n") for _, t in got] == [b.rstrip("\n") for b in books]
    assert [n for n, _ in got] == ["train.txt:b0", "train.txt:b1", "train.txt:b2"]


def test_cache_equals_fresh_tokenization(tmp_path, tok):
    src = tmp_path / "docs"
    src.mkdir()
    for name, text in make_docs(8):
        (src / f"{name}.txt").write_text(text)
    cache = tmp_path / "cache"
    fresh = D.load_token_stream([src], tok, None)
    first = D.load_token_stream([src], tok, cache)
    assert len(list(cache.glob("*.tokens.npy"))) == 1
    second = D.load_token_stream([src], tok, cache)  # read back from disk
    assert isinstance(second.tokens, np.memmap)
    for s in (first, second):
        assert s.tokens.tolist() == fresh.tokens.tolist()
        assert s.starts.tolist() == fresh.starts.tolist() and s.names == fresh.names
    assert second.tokens.dtype == np.uint16
    # a changed file gets a new key and is tokenized again
    f = src / "d0.txt"
    f.write_text("changed text")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    third = D.load_token_stream([src], tok, cache)
    assert third.document(0).tolist() == tok.encode("changed text")
    assert len(list(cache.glob("*.tokens.npy"))) == 2


def test_bpe_trainer_roundtrip_and_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from training.tokenizer_train import train_tokenizer

    texts = [t for _, t in make_docs(200, words=60)]
    path = tmp_path / "tokenizer.json"
    tk = train_tokenizer(texts, vocab_size=300, min_frequency=2, path=path)
    assert tk.eos_token_id == 0 and tk.vocab_size <= 300 and tk.vocab_size > 257
    sample = "the cat sat — naïve café 🐈 <|endoftext|>"
    assert tk.decode(tk.encode(sample)) == sample
    assert len(tk.encode("the cat sat on a mat")) < len(b"the cat sat on a mat")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    assert hf.encode(sample) == tk.encode(sample)
    assert hf.eos_token_id == 0
    loaded = Tokenizer.from_file(path)
    assert loaded.sha256 == tk.sha256
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_recall_examples(tok):
    S = 16
    maker = D.RecallExamples(tok, S)
    window = torch.tensor(tok.encode("z" * 160))  # L + 1 = 160
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        new, mask, dist = maker.make(window, rng)
        seen.add(dist)
        text = tok.decode(new.tolist())
        key = text[text.index("The pass key is ") + 16:][:5]
        assert text.endswith(f"What is the pass key? The pass key is {key}.")
        assert tok.decode(new[1:][mask].tolist()) == f" {key}."
        assert new.shape == window.shape and int(mask.sum()) == len(f" {key}.")
        fact_end = text.index(f"{key} is the pass key.") + len(f"{key} is the pass key.")
        assert (len(text) - len(" What is the pass key? The pass key is 12345.")) // S \
            - (fact_end - 1) // S == dist
    assert seen == {0, 1, 2, 3, 4}  # the fact ends in segments 3..7, the question is in 7
    short = torch.tensor(tok.encode("z" * 40))
    same, mask, dist = maker.make(short, rng)
    assert torch.equal(same, short) and not mask.any() and dist == -1


def test_recall_examples_can_open_a_document_with_the_fact(tok):
    S = 16
    window = torch.tensor(tok.encode("z" * 160))
    opening = D.RecallExamples(tok, S, at_start=1.0)
    rng = random.Random(0)
    for _ in range(10):
        new, mask, dist = opening.make(window, rng)
        assert int(new[0]) == tok.eos_token_id
        assert tok.decode(new[1:].tolist()).startswith(" The pass key is ")
        key = tok.decode(new[1:][mask].tolist())  # " 12345."
        assert tok.decode(new.tolist()).endswith(f"What is the pass key? The pass key is{key}")
        fact = tok.encode(f" The pass key is{key[:-1]}. Remember it.{key[:-1]} is the pass key.")
        q0 = len(window) - len(tok.encode(f" What is the pass key? The pass key is{key}"))
        assert tok.decode(new[1:1 + len(fact)].tolist()) == tok.decode(fact)
        assert dist == q0 // S - len(fact) // S  # the fact ends at token len(fact)
    mixed = D.RecallExamples(tok, S, at_start=0.5)
    starts = [int(mixed.make(window, rng)[0][0]) == tok.eos_token_id for _ in range(200)]
    assert 60 < sum(starts) < 140  # about half open with the fact
    with pytest.raises(ValueError, match="at_start"):
        D.RecallExamples(tok, S, at_start=1.5)


def test_recall_examples_with_secret_words(tok):
    """``words``: that share of examples asks for a word of the window's own prose (letters
    only, 4 or more) instead of five digits; the answer is that word, told twice before."""
    S = 16
    prose = "Ada met Bertram near the orchard gate; twelve ravens watched 1234 quietly. " * 4
    window = torch.tensor(tok.encode(prose)[:241])
    own = {w.strip(".;") for w in prose.split()}
    words = D.RecallExamples(tok, S, words=1.0)
    seen = set()
    for seed in range(30):
        new, mask, dist = words.make(window, random.Random(seed))
        answer = tok.decode(new[1:][mask].tolist())  # " orchard."
        word = answer.strip(" .")
        assert word in own and word.isalpha() and len(word) >= 4 and dist >= 0
        text = tok.decode(new.tolist())
        assert text.endswith(f" What is the secret word? The secret word is {word}.")
        assert f"The secret word is {word}. Remember it. {word} is the secret word." in text
        seen.add(word)
    assert len(seen) >= 4
    mixed = D.RecallExamples(tok, S, words=0.5)
    kinds = ["secret word" in tok.decode(mixed.make(window, random.Random(i))[0].tolist())
             for i in range(100)]
    assert 25 < sum(kinds) < 75
    for seed in range(5):  # words=0: the random stream and the examples as before
        a = D.RecallExamples(tok, S).make(window, random.Random(seed))
        b = D.RecallExamples(tok, S, words=0.0).make(window, random.Random(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(ValueError, match="words"):
        D.RecallExamples(tok, S, words=2.0)


def test_repeat_span_copies_earlier_prose_into_a_later_segment():
    window = torch.arange(1, 66)  # L + 1 = 65: 4 segments of 16 targets
    for seed in range(20):
        new, mask = D.repeat_span(window, 16, 6, random.Random(seed))
        changed = (new != window).nonzero().flatten()
        assert 1 <= len(changed) <= 6 and mask.sum() == 5
        start = int(mask.nonzero()[0])  # target t predicts new[t + 1]: the copy starts at t
        copy = new[start:start + 6]
        src = int((window == copy[0]).nonzero()[0])
        assert torch.equal(window[src:src + 6], copy)  # a verbatim span of the original
        assert src // 16 < start // 16  # from an earlier segment
    same, none = D.repeat_span(window[:17], 16, 6, random.Random(0))  # one segment: no room
    assert torch.equal(same, window[:17]) and not none.any()


def test_repeat_span_scrambled_writes_random_tokens_twice():
    """--repeat-scramble: the source span is overwritten with tokens of the window (never EOS)
    and the copy repeats them; everything else is untouched."""
    window = torch.arange(0, 65)  # token 0 plays EOS
    changed = 0
    for seed in range(20):
        for local in (False, True):
            new, mask = D.repeat_span(window, 16, 6, random.Random(seed), local=local,
                                      scramble=True, eos=0)
            start = int(mask.nonzero()[0])
            copy = new[start:start + 6]
            differs = (new != window).nonzero().flatten().tolist()
            outside = [i for i in differs if not start <= i < start + 6]
            assert len(outside) <= 6 and outside == sorted(outside)  # one overwritten span
            if outside:
                src = outside[0]
                assert torch.equal(new[src:src + 6], copy)
                changed += 1
            assert 0 not in copy.tolist()
            assert all(1 <= t <= 64 for t in copy.tolist())
    assert changed >= 30  # the source is scrambled, not the original prose


def test_repeat_span_local_copies_within_one_segment():
    window = torch.arange(1, 66)  # 4 segments of 16 targets
    for seed in range(30):
        new, mask = D.repeat_span(window, 16, 6, random.Random(seed), local=True)
        assert mask.sum() == 5
        start = int(mask.nonzero()[0])
        copy = new[start:start + 6]
        src = int((window == copy[0]).nonzero()[0])
        assert torch.equal(window[src:src + 6], copy)
        assert src // 16 == (start + 5) // 16  # source and whole copy in one segment
        assert src + 6 <= start  # the copy comes after its source, not over it
    same, none = D.repeat_span(window, 16, 9, random.Random(0), local=True)  # > half a segment
    assert torch.equal(same, window) and not none.any()
