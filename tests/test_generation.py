"""Tests for newllm.generation: sampling, stop handling, final state, batching and scoring."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import assert_states_close
from torch import Tensor, nn

from newllm import ModelConfig, TransformerLM
from newllm.generation import (
    GeneratedToken,
    InvalidParameter,
    SamplingParams,
    complete_text,
    generate,
    generate_batch,
    score,
)
from newllm.state import ModelState
from newllm.tokenizer import Tokenizer

NO_EOS = {"stop_token_ids": ()}  # random tiny models emit EOS (id 0) as readily as anything


def make_model(preset: str, seed: int = 0, std: float = 0.1) -> TransformerLM:
    """A tiny model with weights large enough that its next-token distribution is peaked."""
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig.from_name(preset, init_std=std)).eval()
    return model


def prompt(n: int, seed: int = 1, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def greedy_by_hand(model: TransformerLM, ids: list[int], n: int,
                   state: ModelState | None = None) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]), state)
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits, state = model(torch.tensor([[tok]]), state)
    return out




@pytest.fixture(scope="module")
def models() -> dict[str, TransformerLM]:
    return {p: make_model(p) for p in ("tiny-pythia", "tiny-infini", "tiny-context-kv")}


# a model whose next token is fixed by position: exact control over the generated text ----------
@dataclass(frozen=True)
class Counter:
    seen: Tensor  # (B, 1)


class ScriptedLM(nn.Module):
    """After n tokens it predicts ``script[n]`` (EOS past the end), whatever the tokens were."""

    def __init__(self, script: list[int], vocab_size: int = 257) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, hidden_size=8, num_heads=1,
                                  layers=("pythia",), eos_token_id=0)
        self.script = script
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def init_state(self, batch_size: int = 1) -> ModelState:
        return ModelState(0, (Counter(torch.zeros(batch_size, 1)),))

    def forward(self, ids: Tensor, state: ModelState | None = None, *,
                last_only: bool = False) -> tuple[Tensor, ModelState]:
        state = state or self.init_state(ids.shape[0])
        T = ids.shape[1]
        logits = torch.zeros(ids.shape[0], T, self.config.vocab_size)
        for t in range(T):
            n = state.position + t + 1
            logits[:, t, self.script[n] if n < len(self.script) else 0] = 10.0
        new = ModelState(state.position + T, (Counter(state.layers[0].seen + T),))
        return (logits[:, -1:] if last_only else logits), new

    def decode_step(self, tokens: Tensor,
                    states: list[ModelState]) -> tuple[Tensor, list[ModelState]]:
        rows = [self(t.view(1, 1), s) for t, s in zip(tokens, states, strict=True)]
        return torch.cat([r[0][:, -1] for r in rows]), [r[1] for r in rows]


TOKENIZER = Tokenizer.byte_level()  # EOS 0, byte b -> b + 1; decodes cut UTF-8 as U+FFFD
byte_ids = TOKENIZER.encode
byte_decode = TOKENIZER.decode


def scripted(text: str, prompt_len: int = 3, eos: bool = False) -> ScriptedLM:
    return ScriptedLM([1] * prompt_len + byte_ids(text) + ([0] if eos else [5] * 50))


def run_scripted(text: str, stop: list[str], max_new: int = 100, eos: bool = False,
                 decode=byte_decode):
    model = scripted(text, eos=eos)
    stream = generate(model, [1, 1, 1], params=SamplingParams(max_new_tokens=max_new,
                      temperature=0, stop=stop), decode=decode)
    pieces = [t.text for t in stream]
    return stream, pieces


# greedy and the final state ------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-infini"])
def test_greedy_matches_argmax_loop_across_segments(models, preset):
    model = models[preset]
    ids = prompt(10)
    params = SamplingParams(max_new_tokens=30, temperature=0, **NO_EOS)
    stream = generate(model, ids, params=params)
    tokens = list(stream)
    assert [t.id for t in tokens] == greedy_by_hand(model, ids, 30)
    assert stream.token_ids == [t.id for t in tokens]
    assert stream.finish_reason == "length"
    assert (stream.prompt_tokens, stream.completion_tokens) == (10, 30)
    assert len(set(stream.token_ids)) > 3  # the model does not just repeat one token
    with torch.no_grad():
        _, whole = model(torch.tensor([ids + stream.token_ids]))
    assert stream.state.position == 40  # crossed segment boundaries at 16 and 32
    assert_states_close(stream.state, whole)


def test_continuing_from_a_state_equals_one_transcript(models):
    model = models["tiny-infini"]
    params = SamplingParams(max_new_tokens=7, temperature=0, **NO_EOS)
    first = generate(model, prompt(9), params=params).collect()
    second = generate(model, prompt(5, seed=2), first.state, params).collect()
    transcript = prompt(9) + first.token_ids + prompt(5, seed=2)
    assert second.token_ids == greedy_by_hand(model, transcript, 7)
    with torch.no_grad():
        _, whole = model(torch.tensor([transcript + second.token_ids]))
    assert_states_close(second.state, whole)


def test_input_state_is_not_changed_and_can_be_branched(models):
    model = models["tiny-pythia"]
    base = generate(model, prompt(6), params=SamplingParams(max_new_tokens=3, temperature=0,
                                                            **NO_EOS)).collect().state
    before = {n: t.clone() for n, t in base.flat_tensors().items()}
    params = SamplingParams(max_new_tokens=5, temperature=0, **NO_EOS)
    a = generate(model, [7, 8], base, params).collect()
    b = generate(model, [7, 8], base, params).collect()
    assert a.token_ids == b.token_ids
    for name, t in base.flat_tensors().items():
        assert torch.equal(t, before[name]), name


def test_state_reads_only_after_the_stream_ends(models):
    stream = generate(models["tiny-pythia"], prompt(4), params=SamplingParams(max_new_tokens=3,
                                                                              **NO_EOS))
    next(stream)
    assert stream.finish_reason is None
    with pytest.raises(RuntimeError, match="iterate the stream"):
        _ = stream.state
    assert torch.is_grad_enabled()  # no_grad holds inside the stream only
    stream.collect()
    assert stream.state.position == 7
    assert not any(t.requires_grad for t in stream.state.flat_tensors().values())


def test_zero_new_tokens_reads_the_prompt(models):
    model = models["tiny-pythia"]
    stream = generate(model, prompt(5), params=SamplingParams(max_new_tokens=0)).collect()
    assert stream.token_ids == [] and stream.finish_reason == "length"
    assert stream.state.position == 5


def test_stop_token_ends_with_stop_and_is_consumed(models):
    model = models["tiny-pythia"]
    ids = prompt(8)
    free = generate(model, ids, params=SamplingParams(max_new_tokens=10, temperature=0,
                                                      **NO_EOS)).collect()
    target = free.token_ids[4]
    first = free.token_ids.index(target)
    stream = generate(model, ids, params=SamplingParams(max_new_tokens=10, temperature=0,
                                                        stop_token_ids=[target])).collect()
    assert stream.finish_reason == "stop"
    assert stream.token_ids == free.token_ids[:first + 1]  # the stop token is generated ...
    assert stream.state.position == len(ids) + first + 1  # ... and consumed by the state


# sampling ------------------------------------------------------------------------------------
def test_same_seed_same_tokens_and_different_seeds_differ(models):
    model = models["tiny-infini"]
    ids = prompt(10)

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed, **NO_EOS)
        return generate(model, ids, params=params).collect().token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = generate(model, ids, params=SamplingParams(max_new_tokens=20, temperature=0,
                                                        **NO_EOS)).collect().token_ids
    assert run(1) != greedy  # temperature 1 really samples


@pytest.mark.parametrize("option", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_1_and_tiny_top_p_are_greedy(models, option):
    model = models["tiny-pythia"]
    ids = prompt(10)
    greedy = generate(model, ids, params=SamplingParams(max_new_tokens=15, temperature=0,
                                                        **NO_EOS)).collect()
    sampled = generate(model, ids, params=SamplingParams(max_new_tokens=15, temperature=1.5,
                                                         seed=3, **option, **NO_EOS)).collect()
    assert sampled.token_ids == greedy.token_ids


def test_top_k_keeps_only_the_k_most_likely(models):
    model = models["tiny-pythia"]
    ids = prompt(10)
    params = SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3, **NO_EOS)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), last_only=True)
    allowed = set(logits[0, -1].topk(3).indices.tolist())
    seen = {generate(model, ids, params=params.replace(seed=s)).collect().token_ids[0]
            for s in range(30)}
    assert seen <= allowed and len(seen) > 1


def test_logprobs_are_the_models_and_top_logprobs_sorted(models):
    model = models["tiny-pythia"]
    ids = prompt(10)
    tokens = list(generate(model, ids, params=SamplingParams(max_new_tokens=4, temperature=1.0,
                                                             seed=0, top_logprobs=5, **NO_EOS)))
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + [t.id for t in tokens]]))
    ref = torch.log_softmax(logits[0], dim=-1)  # (T, V)
    for i, tok in enumerate(tokens):
        row = ref[len(ids) - 1 + i]
        assert tok.logprob == pytest.approx(float(row[tok.id]), abs=1e-5)
        assert [i for i, _ in tok.top_logprobs] == row.topk(5).indices.tolist()
        values = [v for _, v in tok.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_vocab_size_restricts_sampling(models):
    model = models["tiny-pythia"]
    params = SamplingParams(max_new_tokens=40, temperature=3.0, seed=0, **NO_EOS)
    free = generate(model, prompt(5), params=params).collect().token_ids
    limited = generate(model, prompt(5), params=params, vocab_size=100).collect().token_ids
    assert max(free) >= 100 and max(limited) < 100


# stop strings (scripted model: the generated text is known in advance) ----------------------
def test_stop_string_is_cut_even_when_split_across_tokens():
    # every byte is one token, so "END" arrives in three tokens
    stream, pieces = run_scripted("hello END world", stop=["END"])
    assert stream.text == "hello " and "".join(pieces) == "hello "
    assert stream.finish_reason == "stop"
    emitted = ""
    for piece in pieces:
        emitted += piece
        assert "E" not in emitted  # a possible stop prefix is held back, never emitted
    assert stream.completion_tokens == len(b"hello END")  # stops at the token completing it
    assert stream.state.position == 3 + len(b"hello END")


def test_earliest_of_several_stop_strings_wins():
    stream, _ = run_scripted("abc\n\nxyz", stop=["xyz", "\n\n", "bc\n"])
    assert stream.text == "a" and stream.finish_reason == "stop"


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    stream, pieces = run_scripted("a ENx ENE", stop=["END"], max_new=9)
    assert stream.text == "a ENx ENE"  # held "EN", "ENE" released: not the stop string
    assert stream.finish_reason == "length"
    assert pieces[-1] == "ENE"  # the tail held back at the end comes with the last token


def test_stop_string_inside_a_multibyte_token_sequence():
    # "é" is two bytes (two tokens); the incomplete first byte must not be emitted as U+FFFD
    stream, pieces = run_scripted("café!é", stop=["!é"])
    assert stream.text == "café" and "\ufffd" not in "".join(pieces)
    assert stream.finish_reason == "stop"


def test_eos_ends_generation_without_text():
    stream, pieces = run_scripted("hi", stop=[], eos=True)
    assert stream.text == "hi" and stream.finish_reason == "stop"
    assert stream.token_ids[-1] == 0 and pieces[-1] == ""


def test_stop_on_a_token_that_decodes_to_many_characters():
    # one token -> "x\n\ny": the stop string sits inside a single token; the text before it stays
    words = {1: "", 2: "ab", 3: "x\n\ny", 4: "zz"}
    model = ScriptedLM([1, 2, 3, 4, 4, 4], vocab_size=8)
    stream = generate(model, [1], params=SamplingParams(max_new_tokens=5, temperature=0,
                      stop=["\n\n"]), decode=lambda ids: "".join(words[i] for i in ids)).collect()
    assert stream.text == "abx" and stream.token_ids == [2, 3]


def test_text_equals_decoding_all_tokens_for_random_bytes(models):
    # random byte sequences are full of incomplete UTF-8: pieces must still add up
    model = models["tiny-pythia"]
    params = SamplingParams(max_new_tokens=60, temperature=2.0, seed=5, **NO_EOS)
    stream = generate(model, prompt(4), params=params, decode=byte_decode, vocab_size=257)
    pieces = [t.text for t in stream]
    assert "".join(pieces) == byte_decode(stream.token_ids) == stream.text


# validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", -1), ("max_new_tokens", 10**9), ("max_new_tokens", 2.5),
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("seed", 2**64), ("seed", "7"), ("stop", [""]),
    ("stop", ["x"] * 17), ("stop", 5), ("stop_token_ids", [-1]), ("top_logprobs", 21),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, InvalidParameter) and info.value.param == field


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ("###",)


def test_generate_refuses_bad_input(models):
    model = models["tiny-pythia"]
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [])
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [1, 512])
    with pytest.raises(ValueError, match="not text"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [1.0, 2.0])
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(model, [1], params=SamplingParams(stop_token_ids=[600]))
    with pytest.raises(ValueError, match="decode"):
        generate(model, [1], params=SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, [1], model.init_state(2))


# batching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [None, 2])
def test_generate_batch_equals_separate_generate_calls(models, max_batch):
    """All sessions in slots at once, or at most two at a time (the rest wait their turn)."""
    cases = [
        ("tiny-pythia", prompt(3, seed=1), 12),
        ("tiny-pythia", prompt(17, seed=2), 5),
        ("tiny-pythia", prompt(9, seed=3), 0),
        ("tiny-pythia", prompt(1, seed=4), 20),
    ]
    for preset in ("tiny-pythia", "tiny-infini", "tiny-context-kv"):
        model = models[preset]
        base = generate(model, prompt(20, seed=9), params=SamplingParams(
            max_new_tokens=2, temperature=0, **NO_EOS)).collect().state
        prompts = [ids for _, ids, _ in cases]
        states = [None, base, None, base]
        params = [SamplingParams(max_new_tokens=n, temperature=0, **NO_EOS) for *_, n in cases]
        params[3] = SamplingParams(max_new_tokens=20, temperature=0.8, seed=11, **NO_EOS)
        batch = generate_batch(model, prompts, states, params, max_batch=max_batch)
        for got, ids, state, p in zip(batch, prompts, states, params, strict=True):
            want = generate(model, ids, state, p).collect()
            assert got.token_ids == want.token_ids, preset
            assert got.finish_reason == want.finish_reason
            assert [t.logprob for t in got.tokens] == pytest.approx(
                [t.logprob for t in want.tokens], abs=1e-4)
            assert_states_close(got.state, want.state)


def test_generate_batch_with_stop_strings_and_eos():
    model = scripted("one. two", eos=True)
    params = [SamplingParams(max_new_tokens=20, temperature=0, stop=["."]),
              SamplingParams(max_new_tokens=2, temperature=0),
              SamplingParams(max_new_tokens=20, temperature=0)]
    prompts = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    batch = generate_batch(model, prompts, None, params, byte_decode)
    assert [s.text for s in batch] == ["one", "on", "one. two"]
    assert [s.finish_reason for s in batch] == ["stop", "length", "stop"]
    assert [s.state.position for s in batch] == [7, 5, 12]  # "one." / "on" / "one. two" + EOS


# scoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-pythia", "tiny-infini"])
def test_score_matches_log_softmax(models, preset):
    model = models[preset]
    ids = prompt(40)
    scores = score(model, ids, top_logprobs=3, chunk_size=7)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    ref = torch.log_softmax(logits[0], dim=-1)  # (T, V)
    assert scores[0].logprob is None and scores[0].id == ids[0]
    assert [s.id for s in scores] == ids
    for t in range(1, len(ids)):
        assert scores[t].logprob == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-5)
        assert [i for i, _ in scores[t].top_logprobs] == ref[t - 1].topk(3).indices.tolist()


def test_score_after_a_state_equals_scoring_the_whole_text(models):
    model = models["tiny-infini"]
    ids = prompt(30)
    with torch.no_grad():
        _, state = model(torch.tensor([ids[:13]]))
    tail = score(model, ids[13:], state)
    whole = score(model, ids)
    assert tail[0].logprob is None
    assert [s.logprob for s in tail[1:]] == pytest.approx([s.logprob for s in whole[14:]],
                                                          abs=1e-5)


def test_generated_token_is_a_value():
    t = GeneratedToken(3, -0.5, "x")
    assert t.top_logprobs == () and t == GeneratedToken(3, -0.5, "x")


def test_tensor_and_numpy_prompts_equal_list_prompts(models):
    import numpy as np
    model = models["tiny-pythia"]
    ids = prompt(6)
    params = SamplingParams(max_new_tokens=4, temperature=0, **NO_EOS)
    want = generate(model, ids, params=params).collect().token_ids
    assert generate(model, torch.tensor(ids), params=params).collect().token_ids == want
    assert generate(model, np.array(ids), params=params).collect().token_ids == want


def test_complete_text_decodes_with_the_tokenizer(models):
    model, tok = models["tiny-pythia"], TOKENIZER
    params = SamplingParams(max_new_tokens=12, temperature=0)
    stream = generate(model, tok.encode("abc"), params=params, decode=tok.decode,
                      vocab_size=tok.vocab_size).collect()
    assert complete_text(model, tok, "abc", params) == stream.text
    assert all(i < tok.vocab_size for i in stream.token_ids)
    from_eos = generate(model, [model.config.eos_token_id], params=params, decode=tok.decode,
                        vocab_size=tok.vocab_size).collect()
    assert complete_text(model, tok, "", params) == from_eos.text
