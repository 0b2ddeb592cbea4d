"""`Session`: the seeds' stateful API over the stateless model (feed, peek, reset, get/set the
memory state, sizes, save/restore through memory files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import make

from newllm.memory_file import (
    MemoryFileError,
    TensorMismatchError,
    TokenizerMismatchError,
    read_memory_metadata,
)
from newllm.session import Session, check_state_fits
from newllm.state import ModelState

TINY = ["tiny-pythia", "tiny-infini", "tiny-multi-memory", "tiny-hierarchical",
        "tiny-context-pythia", "tiny-context-kv"]




def ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class ByteTokenizer:
    """Enough of a tokenizer for a session: bytes as ids, and a hash."""

    def __init__(self, sha256: str = "c" * 64) -> None:
        self.sha256 = sha256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def flat_equal(a: ModelState, b: ModelState) -> bool:
    fa, fb = a.flat_tensors(), b.flat_tensors()
    return a.position == b.position and list(fa) == list(fb) and all(
        torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("name", TINY)
def test_feed_matches_the_model_and_any_split(name: str) -> None:
    model = make(name)
    text = ids(41)
    with torch.no_grad():
        whole, state = model(torch.tensor([text]))
    session = Session(model)
    pieces = [session.feed(text[:7]), session.feed(torch.tensor(text[7:20])),
              session.feed(torch.tensor([text[20:]]))]
    assert [p.shape for p in pieces] == [(7, 512), (13, 512), (21, 512)]
    assert not any(p.requires_grad for p in pieces)
    torch.testing.assert_close(torch.cat(pieces), whole[0], atol=2e-5, rtol=1e-5)
    assert session.tokens_seen == 41 == state.position
    assert session.memory_bytes() == state.nbytes()
    assert session.resident_bytes() >= session.memory_bytes()


@pytest.mark.parametrize("name", ["tiny-infini", "tiny-context-kv"])
def test_feed_without_updating_memory_leaves_the_state_alone(name: str) -> None:
    model = make(name)
    session = Session(model)
    session.feed(ids(20))
    before = session.get_memory_state()
    snapshot = {k: v.clone() for k, v in before.flat_tensors().items()}
    peek = session.feed(ids(9, seed=2), update_memory=False)
    assert session.get_memory_state() is before and session.tokens_seen == 20
    assert all(torch.equal(v, snapshot[k]) for k, v in before.flat_tensors().items())
    # the peek saw the memory, and equals what remembering would have given
    real = session.feed(ids(9, seed=2))
    assert session.tokens_seen == 29
    torch.testing.assert_close(peek, real)


def test_reset_memory_returns_to_position_zero() -> None:
    model = make("tiny-hierarchical")
    session = Session(model)
    first = session.feed(ids(30))
    assert session.tokens_seen == 30
    session.reset_memory()
    assert session.tokens_seen == 0
    assert flat_equal(session.get_memory_state(), model.init_state(1))
    torch.testing.assert_close(session.feed(ids(30)), first)  # same text, same logits


def test_memory_bytes_bounded_for_memory_models_growing_for_pythia() -> None:
    sizes = {}
    for name in ("tiny-pythia", "tiny-infini"):
        session = Session(make(name))
        session.feed(ids(16))
        small = session.memory_bytes()
        session.feed(ids(48, seed=3))
        sizes[name] = (small, session.memory_bytes())
    assert sizes["tiny-pythia"][1] == 4 * sizes["tiny-pythia"][0]  # KV cache: 64 vs 16 tokens
    assert sizes["tiny-infini"][1] == sizes["tiny-infini"][0]  # at segment ends: memory only


def test_set_memory_state_checks_the_state_fits() -> None:
    model = make("tiny-infini")
    session = Session(model)
    session.feed(ids(10))
    before = session.get_memory_state()
    for other in ("tiny-pythia", "tiny-context-pythia", "tiny-multi-memory"):
        other_model = make(other)
        with torch.no_grad():
            _, foreign = other_model(torch.tensor([ids(21)]))
        with pytest.raises(TensorMismatchError):
            session.set_memory_state(foreign)
        assert session.get_memory_state() is before
    with torch.no_grad():
        _, own = model(torch.tensor([ids(21)]))
    with pytest.raises(TensorMismatchError, match="after 22 tokens"):
        session.set_memory_state(ModelState(22, own.layers, own.context))  # position lies
    with pytest.raises(TensorMismatchError, match="float64"):
        session.set_memory_state(own.to(dtype=torch.float64))
    with pytest.raises(TypeError):
        session.set_memory_state({"layers.0.memory": torch.zeros(1)})  # type: ignore[arg-type]
    assert session.get_memory_state() is before
    session.set_memory_state(own)
    assert session.tokens_seen == 21
    check_state_fits(own, model)
    assert Session(model, state=own).tokens_seen == 21


def test_bad_ids_are_refused_and_change_nothing() -> None:
    model = make("tiny-pythia")
    session = Session(model)
    session.feed(ids(5))
    before = session.get_memory_state()
    with pytest.raises(ValueError, match="512"):
        session.feed([3, 512])
    with pytest.raises(ValueError):
        session.feed([-1])
    with pytest.raises(TypeError):
        session.feed(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch"):
        session.feed(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        session.feed(torch.zeros(1, 1, 3, dtype=torch.long))
    assert session.get_memory_state() is before
    assert session.feed([]).shape == (0, 512) and session.tokens_seen == 5


def test_feed_text_uses_the_tokenizer() -> None:
    model = make("tiny-infini")
    session = Session(model, ByteTokenizer())
    logits = session.feed_text("hello")
    assert logits.shape == (5, 512) and session.tokens_seen == 5
    with pytest.raises(ValueError, match="tokenizer"):
        Session(model).feed_text("hello")


def test_batched_session() -> None:
    model = make("tiny-context-kv")
    session = Session(model, state=model.init_state(2))
    batch = torch.tensor([ids(12), ids(12, seed=4)])
    logits = session.feed(batch)
    assert logits.shape == (2, 12, 512) and session.batch_size == 2
    session.reset_memory()
    assert session.batch_size == 2 and session.tokens_seen == 0


def test_save_and_load(tmp_path: Path) -> None:
    model = make("tiny-multi-memory")
    tokenizer = ByteTokenizer()
    session = Session(model, tokenizer)
    session.feed(ids(37))
    path = tmp_path / "chat.safetensors"
    data = session.save(path, metadata={"title": "test"})
    assert path.read_bytes() == data
    assert read_memory_metadata(path)["tokenizer_hash"] == tokenizer.sha256
    loaded = Session.load(path, model, tokenizer)
    assert loaded.tokens_seen == 37 and loaded.tokenizer is tokenizer
    assert flat_equal(loaded.get_memory_state(), session.get_memory_state())
    torch.testing.assert_close(loaded.feed(ids(5, seed=9)), session.feed(ids(5, seed=9)))
    with pytest.raises(TokenizerMismatchError):
        Session.load(data, model, ByteTokenizer("d" * 64))
    # restore in place: a bad file changes nothing, a good one replaces the memory
    other = Session(model)
    other.feed(ids(3))
    before = other.get_memory_state()
    with pytest.raises(MemoryFileError):
        other.restore(data[:-10])
    assert other.get_memory_state() is before
    other.restore(data)
    assert other.tokens_seen == 37
