"""Slots (the batch state) against the plain reference: one ``model(token, state)`` per session.

For every kind: sessions at different positions decoded together, one crossing a segment
boundary during the batch, one joining mid-way, one leaving, give the logits each gives alone,
and the states taken out of the slots save to memory files that load and continue with the
same greedy tokens as the sequential path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_states_close,
    decode_rows_like_alone,
    read_state,
    variant_model,
)

from newllm.generation import SamplingParams, generate
from newllm.memory_file import load_memory, save_memory
from newllm.scheduler import Scheduler
from newllm.slots import Slots, SlotsFull
from newllm.state import ModelState


def greedy(model: Any, state: ModelState, first: int, n: int = 12) -> list[int]:
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    return generate(model, [first], state, params).collect().token_ids


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_slots_decode_like_separate_sessions(variant: str) -> None:
    model = variant_model(variant)
    # positions 3, 14 (crosses the segment boundary at 16 on its 3rd step), 29, and 40 (joins)
    starts = {"a": read_state(model, 3, 1), "b": read_state(model, 14, 2),
              "c": read_state(model, 29, 3)}
    late = read_state(model, 40, 4)
    slots = Slots(model, 4)
    handle = {name: slots.add(s) for name, s in starts.items()}
    ref = dict(starts)
    # "d" joins mid-way, "a" leaves mid-way; rows in any order
    decode_rows_like_alone(model, slots, handle, ref, late, join="d", join_at=4, leave_at=9)
    assert ref["b"].position > 16  # "b" crossed a segment boundary inside the batch
    for name, h in handle.items():
        out = slots.state(h)
        assert_states_close(out, ref[name])
        # the state taken out saves to a file that loads and continues like the sequential one
        loaded = load_memory(save_memory(out, model), model)
        assert greedy(model, loaded, 7) == greedy(model, ref[name], 7)


@pytest.mark.parametrize("variant", ["tiny-infini", "tiny-context-kv", "pythia-no-window"])
def test_a_state_goes_into_a_slot_and_out_unchanged(variant: str) -> None:
    """In and out with no step between: the same memory file, byte for byte."""
    model = variant_model(variant)
    slots = Slots(model, 3)
    states = [read_state(model, n, n) for n in (0, 21, 70)]
    handles = [slots.add(s) for s in states]
    slots.discard(handles[0])  # the last row moves into the freed one
    for s, h in zip(states[1:], handles[1:], strict=True):
        assert save_memory(slots.state(h), model) == save_memory(s, model)


@pytest.mark.parametrize("variant", ["tiny-infini", "tiny-context-kv", "pythia-no-window"])
def test_a_freed_slot_is_reused_and_stale_values_do_not_leak(variant: str) -> None:
    """A slot whose last session was left with NaN in its buffers serves the next one exactly."""
    model = variant_model(variant)
    slots = Slots(model, 2)
    h = slots.add(read_state(model, 30, 1))
    for buf in slots.layers:  # poison every buffer of both slots
        for t in [v for v in vars(buf).values() if isinstance(v, torch.Tensor)]:
            t.fill_(float("nan"))
    slots.discard(h)
    short, long = read_state(model, 5, 2), read_state(model, 60, 3)
    hs = [slots.add(short), slots.add(long)]  # the short row is read as wide as the long one
    logits = slots.step(hs, torch.tensor([9, 9]))
    with torch.no_grad():
        for i, state in enumerate((short, long)):
            alone, _ = model(torch.tensor([[9]]), state)
            torch.testing.assert_close(logits[i], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_slots_refuse_what_they_cannot_hold() -> None:
    model = variant_model("tiny-pythia")
    slots = Slots(model, 1)
    h = slots.add(read_state(model, 4, 1))
    with pytest.raises(SlotsFull):
        slots.add(read_state(model, 4, 2))
    with pytest.raises(ValueError, match="batch size 1"):
        Slots(model, 2).add(model.init_state(2))
    with pytest.raises(ValueError, match="twice"):
        slots.step([h, h], torch.tensor([1, 2]))
    with pytest.raises(KeyError, match="no session"):
        slots.step([h + 1], torch.tensor([1]))
    assert slots.position_of(h) == 4 and len(slots) == 1 and slots.free == 0


@pytest.mark.parametrize("variant", ["tiny-infini", "tiny-context-kv", "pythia-no-window",
                                     "mixed"])
def test_chunked_prefill_interleaved_with_decoding_is_exact(variant: str) -> None:
    """A 45-token prompt read 8 tokens per step while two sessions decode gives the logits and
    state of reading it at once; the decoding sessions are unaffected."""
    model = variant_model(variant)
    slots = Slots(model, 3)
    sched = Scheduler(model, slots, prefill_chunk=8)
    ref = {slots.add(read_state(model, n, n)): read_state(model, n, n) for n in (6, 15)}
    prompt = torch.randint(1, 500, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    base = read_state(model, 11, 11)
    sched.read("p", prompt, base)
    ready: list[Any] = []
    steps = 0
    while not ready:
        tokens = {h: 3 + steps for h in ref}
        ready, logits = sched.step(tokens)
        assert logits is not None
        with torch.no_grad():
            for row, h in enumerate(tokens):
                alone, ref[h] = model(torch.tensor([[tokens[h]]]), ref[h])
                torch.testing.assert_close(logits[row], alone[0, -1], atol=1e-5, rtol=1e-5)
        steps += 1
    assert steps == 6  # ceil(45 / 8): one chunk per step
    (done,) = ready
    with torch.no_grad():
        once, whole = model(torch.tensor([prompt]), base)
    assert done.key == "p" and done.error is None
    torch.testing.assert_close(done.logits, once[0, -1], atol=1e-5, rtol=1e-5)
    assert_states_close(done.state, whole)
    # several short prompts share one step's chunk
    for k in range(3):
        sched.read(k, [5, 6], base)
    ready, logits = sched.step({})
    assert [r.key for r in ready] == [0, 1, 2] and logits is None and not sched.busy


@pytest.mark.parametrize("variant", ["tiny-infini", "tiny-context-kv", "mixed"])
def test_a_step_that_fails_part_way_leaves_the_slots_as_they_were(
        variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last layer raises after the memory layers wrote a completed segment: the slots are
    restored, and the step then retried gives the reference logits."""
    model = variant_model(variant)
    slots = Slots(model, 2)
    # the first completes a segment (16)
    states = [read_state(model, 15, 1), read_state(model, 7, 2)]
    handles = [slots.add(s) for s in states]
    last = model.layers[-1].attention
    real = last.slot_step
    monkeypatch.setattr(last, "slot_step", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        slots.step(handles, torch.tensor([4, 5]))
    for h, s in zip(handles, states, strict=True):
        assert_states_close(slots.state(h), s)
    monkeypatch.setattr(last, "slot_step", real)
    logits = slots.step(handles, torch.tensor([4, 5]))
    with torch.no_grad():
        for i, s in enumerate(states):
            alone, after = model(torch.tensor([[4 + i]]), s)
            torch.testing.assert_close(logits[i], alone[0, -1], atol=1e-5, rtol=1e-5)
            assert_states_close(slots.state(handles[i]), after)
