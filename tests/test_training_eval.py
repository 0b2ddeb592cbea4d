"""Evaluation: sliding-window perplexity against an obviously right per-token computation,
stride == window against segment-wise evaluation, memory on/off, passkey, reversal curse."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from newllm import create_model
from newllm.tokenizer import Tokenizer
from training.evaluate import (
    completion_nll,
    copy_test,
    feed,
    memory_benefit,
    memory_only_nll,
    passkey_accuracy,
    passkey_example,
    perplexity,
    reversal_curse,
    sliding_window_nll,
    streaming_nll,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops, one thread


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {k: create_model(k, "tiny").eval() for k in ("pythia", "infini")}


def ids_of(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 257, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def nll_of(model, context: torch.Tensor, target: int) -> float:
    logits, _ = model(context.view(1, -1))
    return -float(F.log_softmax(logits[0, -1].double(), -1)[target])


@pytest.mark.parametrize("kind", ["pythia", "infini"])
@pytest.mark.parametrize("window,stride", [(8, 1), (8, 3), (8, 8), (20, 7)])
def test_sliding_window_equals_per_token_reference(models, kind, window, stride):
    model, ids = models[kind], ids_of(37)
    got, n = sliding_window_nll(model, ids, window, stride, chunk=5)
    assert n == len(ids) - 1
    ref = 0.0
    for t in range(1, len(ids)):
        k = max(0, math.ceil((t - window) / stride))  # the first window whose targets reach t
        ref += nll_of(model, ids[k * stride:t], int(ids[t]))
        assert t - k * stride <= window
    assert got == pytest.approx(ref, rel=1e-5)


def test_window_covering_everything_is_one_forward(models):
    model, ids = models["pythia"], ids_of(30)
    with torch.no_grad():
        logits, _ = model(ids[:-1].view(1, -1))
    full = float(F.cross_entropy(logits[0].double(), ids[1:], reduction="sum"))
    assert sliding_window_nll(model, ids, 64, 64)[0] == pytest.approx(full, rel=1e-6)
    assert streaming_nll(models["infini"], ids, chunk=7)[0] == pytest.approx(
        sliding_window_nll(models["infini"], ids, 29, 29)[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["pythia", "infini"])
@pytest.mark.parametrize("chunk,keep_from", [(0, 11), (7, 0), (7, 14), (7, 20), (7, 69)])
def test_feed_keeps_only_the_logits_asked_for(models, kind, chunk, keep_from):
    """Chunks before ``keep_from`` skip the LM head; the kept logits are the full call's."""
    model, ids = models[kind], ids_of(70)
    full = feed(model, ids, chunk)
    kept = feed(model, ids, chunk, keep_from=keep_from)
    assert kept.shape == (70 - keep_from, model.config.vocab_size)
    assert torch.equal(kept, full[keep_from:])


def test_stride_equal_window_is_segment_wise(models):
    model, ids = models["infini"], ids_of(70)
    S = model.config.segment_len
    inputs, targets = ids[:-1], ids[1:]
    ref = 0.0
    for s in range(0, len(inputs), S):  # each segment from an empty state
        with torch.no_grad():
            logits, _ = model(inputs[s:s + S].view(1, -1))
        ref += float(F.cross_entropy(logits[0].double(), targets[s:s + S], reduction="sum"))
    got, n = sliding_window_nll(model, ids, S, S)
    assert n == 69 and got == pytest.approx(ref, rel=1e-6)
    bench = memory_benefit(model, [("doc", ids)])
    row = bench["documents"][0]
    assert row["ppl_reset"] == pytest.approx(math.exp(ref / 69), rel=1e-6)
    assert row["ppl_full_state"] == pytest.approx(math.exp(streaming_nll(model, ids)[0] / 69),
                                                  rel=1e-6)
    assert row["ppl_memory"] != row["ppl_reset"]  # the memory is read
    report = perplexity(model, [("a", ids[:30]), ("b", ids[30:])], 16, 8)
    assert report["tokens"] == 29 + 39 and len(report["documents"]) == 2
    with pytest.raises(ValueError, match="stride"):
        sliding_window_nll(model, ids, 8, 9)


class Induction(nn.Module):
    """A stand-in model that copies: it predicts the token that followed the latest earlier
    occurrence of the last ``k`` tokens (what a perfect retrieval memory would do)."""

    def __init__(self, k: int = 8) -> None:
        super().__init__()
        self.k, self.config = k, create_model("infini", "tiny").config
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids, state=None):
        seen = (state or []) + ids[0].tolist()
        start = len(state or [])
        logits = torch.full((1, ids.shape[1], 257), -10.0)
        for i in range(start, len(seen)):
            key = seen[max(0, i - self.k + 1):i + 1]
            for j in range(i - 1, len(key) - 2, -1):
                if seen[j - len(key) + 1:j + 1] == key:
                    logits[0, i - start, seen[j + 1]] = 10.0
                    break
        return logits, seen

    @property
    def device(self):
        return torch.device("cpu")


def test_passkey_layout_and_scoring(models):
    tok = Tokenizer.byte_level()
    S = 16
    for d in (0, 1, 3):
        ids, start, n = passkey_example(tok, d, S, random.Random(d))
        text = tok.decode(ids[1:].tolist())
        key = tok.decode(ids[start:start + n].tolist()).strip()
        assert text.endswith(f"The pass key is {key}") and len(key) == 5
        fact_end = text.index(f"{key} is the pass key.") + len(f"{key} is the pass key.") + 1
        question = text.index("What is the pass key?")  # in tokens = bytes + 1 for the EOS
        assert question // S - (fact_end - 1) // S == d
    perfect = passkey_accuracy(Induction(), tok, distances=(0, 2), trials=4)
    assert perfect["by_distance"] == {"0": 1.0, "2": 1.0}
    assert perfect["first_token_by_distance"] == {"0": 1.0, "2": 1.0}
    assert "note" in perfect  # no memory layers: the report says what that means

    class SpaceOnly(Induction):
        """Right about the space before the key and nothing else."""

        def forward(self, ids, state=None):
            logits, seen = super().forward(ids, state)
            logits.fill_(-10.0)
            logits[..., tok.encode(" ")[0]] = 10.0
            return logits, seen

    for filler in (None, "Amelia walked over the hills with Bartholomew and a lantern. " * 9):
        ids, start, n = passkey_example(tok, 1, S, random.Random(1), word="meadow")
        assert tok.decode(ids[start:start + n].tolist()) == " meadow"
        assert "The secret word is meadow." in tok.decode(ids.tolist())
        worded = passkey_accuracy(Induction(), tok, distances=(0, 2), trials=4,
                                  filler_text=filler, words=True)
        assert worded["key"] == "words" and worded["by_distance"] == {"0": 1.0, "2": 1.0}
        assert worded["words_from"] == ("filler" if filler else "built-in list")
    assert perfect["key"] == "digits"

    spaces = passkey_accuracy(SpaceOnly(), tok, distances=(0, 2), trials=4)
    assert spaces["first_token_by_distance"] == {"0": 0.0, "2": 0.0}  # the space is not free
    random_model = passkey_accuracy(models["infini"], tok, distances=(1,), trials=3)
    assert "note" not in random_model
    assert random_model["by_distance"]["1"] == 0.0
    # first digit with the byte tokenizer: chance for an untrained model, not a free 100%
    assert random_model["first_token_by_distance"]["1"] < 0.5
    # an untrained model over 500 tokens pays about ln(500) nats per answer token
    assert random_model["answer_nll_by_distance"]["1"] > 4.0
    assert perfect["answer_nll_by_distance"]["0"] < random_model["answer_nll_by_distance"]["1"]


def test_copy_test_tells_a_copier_from_a_model_that_does_not_copy(models):
    """The copy test: a span repeated d segments later (checked on the sequences fed), a
    copying stand-in pays far less on the repeat, an untrained model the same."""
    tok = Tokenizer.byte_level()
    fed = []

    class Recording(Induction):
        def forward(self, ids, state=None):
            logits, seen = super().forward(ids, state)
            fed.append(seen)
            return logits, seen

    copier = copy_test(Recording(k=2), tok, distances=(0, 1, 3), trials=6, span=7)
    S = copier["segment_len"]
    sequences = [s for s, nxt in zip(fed, fed[1:] + [[]], strict=True) if nxt[:len(s)] != s]
    assert len(sequences) == 18  # 6 trials x 3 distances, each fed from an empty state
    for i, seq in enumerate(sequences):
        d = (0, 1, 3)[i // 6]
        n = 7
        repeat = len(seq) + 1 - n  # where the repeat starts (its last token is not fed)
        span = seq[repeat:]
        first = next(j for j in range(repeat) if seq[j:j + n - 1] == span)  # the first pass
        assert first < repeat - n + 1  # the span is there twice, apart
        assert repeat // S - (first + n - 1) // S == d and (repeat + n - 1) // S == repeat // S
    for d in ("0", "1", "3"):
        assert copier["repeat_nll"][d] < copier["first_nll"][d] - 1.5
        assert copier["repeat_top1"][d] >= 0.5
    plain = copy_test(models["infini"], tok, distances=(0, 2), trials=4, span=7)
    for d in ("0", "2"):
        assert plain["repeat_top1"][d] < 0.2
        assert abs(plain["repeat_nll"][d] - plain["first_nll"][d]) < 0.5
    with pytest.raises(ValueError, match="span must be 2 to 7 tokens"):
        copy_test(models["infini"], tok, span=8)
    with pytest.raises(ValueError, match="distances >= 0"):
        copy_test(models["infini"], tok, distances=(0, -1))


def test_reversal_curse_report(tmp_path, models):
    tok = Tokenizer.byte_level()
    facts = [("Alice Zed is", " the painter of blue moons."),
             ("Bob Yew is", " the keeper of old bells.")]
    rev = [("The painter of blue moons is", " Alice Zed."),
           ("The keeper of old bells is", " Bob Yew.")]
    for name, pairs in (("p2d_prompts_train", facts), ("p2d_prompts_test", facts),
                        ("p2d_reverse_prompts_test", rev)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    model = models["pythia"]
    out = reversal_curse(model, tok, tmp_path, "p2d")
    assert out["gap"] == pytest.approx(out["backward_ppl"] - out["forward_ppl"])
    assert out["forward_tokens"] == sum(len(c.encode()) for _, c in facts)
    nll, n = completion_nll(model, tok, facts[:1])
    ids = torch.tensor([0] + tok.encode(facts[0][0] + facts[0][1]))
    p = 1 + len(facts[0][0].encode())
    logits = feed(model, ids[:-1])
    ref = float(F.cross_entropy(logits[p - 1:].double(), ids[p:], reduction="sum"))
    assert n == len(ids) - p and nll == pytest.approx(ref, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="name_description_dataset"):
        reversal_curse(model, tok, tmp_path, "d2p")


def test_memory_only_carries_just_the_memory(models):
    ids = ids_of(60, seed=5)
    S = models["pythia"].config.segment_len
    # no memory layers: nothing is carried, so it is the segment-local evaluation
    assert memory_only_nll(models["pythia"], ids)[0] == pytest.approx(
        sliding_window_nll(models["pythia"], ids, S, S)[0], rel=1e-6)
    # only memory layers: everything is carried, so it is the streaming evaluation
    torch.manual_seed(0)
    only_memory = create_model("infini", "tiny", layers=("infini", "hierarchical")).eval()
    got, n = memory_only_nll(only_memory, ids)
    assert n == 59 and got == pytest.approx(streaming_nll(only_memory, ids)[0], rel=1e-6)
    # memory + pythia layers that keep their whole KV cache: only the memory is carried
    torch.manual_seed(0)  # sharp weights and an open gate, so every effect is far above noise
    mixed = create_model("infini", "tiny", segment_local=False, init_std=0.3,
                         gate_init=2.0).eval()
    memory, _ = memory_only_nll(mixed, ids)
    full, _ = streaming_nll(mixed, ids)
    reset, _ = sliding_window_nll(mixed, ids, S, S)
    assert abs(memory - full) > 0.1 and abs(memory - reset) > 0.1
    local = create_model("infini", "tiny", segment_local=True, init_std=0.3, gate_init=2.0)
    local.load_state_dict(mixed.state_dict())
    assert memory_only_nll(local.eval(), ids)[0] == pytest.approx(memory, rel=1e-6)
