"""The compiled decode step (`Slots` with ``compile``) against the eager reference.

The eager ``model(token, state)`` is the reference. For every kind: one session decoded with
the inductor-compiled step over a few dozen tokens crossing segment (and chunk) boundaries
gives the same logits (fp32, 1e-5) and ends in the same state; `generate` with ``compile``
gives the same tokens. The fixed-shape step itself (``SlotStep.fixed``: whole buffers, masks,
segment writes after the step) is checked for every variant with torch.compile's "eager"
backend, which traces it exactly as inductor does (one graph, no breaks) but compiles nothing:
several sessions joining and leaving, rows in any order. A counting backend shows that one
compiled graph serves every token (no compile per token), and the switches: ``NEWLLM_COMPILE``,
falling back to eager when compiling fails, and from inductor's C++ wrapper (the CPU default)
to its Python one when the C++ one fails.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    TINY_PRESETS,
    VARIANTS,
    assert_states_close,
    decode_rows_like_alone,
    make_tiny_model,
    read_state,
    variant_model,
)

from newllm import slots as slots_module
from newllm.generation import SamplingParams, generate
from newllm.layers import common
from newllm.layers.common import GROW_QUANTUM, KVSlots, grown_capacity
from newllm.slots import Slots, compile_enabled
from newllm.state import ModelState


@pytest.fixture(autouse=True)
def _compile_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEWLLM_COMPILE", raising=False)  # conftest turns it off for the rest






def decode_alone(model: Any, state: ModelState, slots: Slots, steps: int,
                 seed: int = 5) -> ModelState:
    """Decode one session ``steps`` tokens in ``slots`` and with the eager model, comparing
    logits at every step; returns the eager state (the slot's is compared with it)."""
    handle = slots.add(state)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        token = torch.randint(1, 500, (1,), generator=g)
        logits = slots.step([handle], token)
        assert torch.equal(slots.peaks, logits.abs().amax(dim=1))  # fused into the step
        with torch.no_grad():
            alone, state = model(token.view(1, 1), state)
        torch.testing.assert_close(logits[0], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert_states_close(slots.remove(handle), state)
    assert slots.compiled or not compile_enabled(True), "fell back to eager: nothing compared"
    return state


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_inductor_step_gives_the_eager_logits_for_every_kind(preset: str) -> None:
    model = make_tiny_model(preset, init_std=0.1)
    slots = Slots(model, 1, compile=True)
    assert slots.compiled
    # from position 5, 40 tokens: segment boundaries (16) at 16, 32, 48... chunk ends (8) too
    state = decode_alone(model, read_state(model, 5, 1), slots, 40)
    assert state.position == 45
    # a second session in the same slots continues on the same compiled code
    decode_alone(model, read_state(model, 30, 2), slots, 6, seed=6)
    # generate with the compiled step: the same greedy tokens and final state as eager
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=())
    start = read_state(model, 9, 3)
    eager = generate(model, [7], start, params, compile=False).collect()
    compiled = generate(model, [7], start, params, compile=True).collect()
    assert compiled.token_ids == eager.token_ids
    assert_states_close(compiled.state, eager.state)
    for a, b in zip(compiled.tokens, eager.tokens, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-5


def test_inductor_step_over_several_sessions_with_changing_rows() -> None:
    """Rows join and leave (1, 2, 3 rows: recompiled with dynamic sizes, not per token)."""
    model = variant_model("mixed")
    check_batched(model, Slots(model, 4, compile=True))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fixed_step_decodes_like_separate_sessions(variant: str) -> None:
    model = variant_model(variant)
    slots = Slots(model, 4, compile=True, backend="eager")
    check_batched(model, slots)
    # one session alone, across several segments, still one graph per shape
    decode_alone(model, read_state(model, 3, 9), slots, 40)


@pytest.mark.parametrize("variant", ["mixed", "pythia-no-window", "tiny-context-kv",
                                     "tiny-context-pythia"])  # every kind of slot buffer
def test_busy_slots_switch_between_eager_and_fixed_steps(variant: str) -> None:
    """What the server does when its background compile ends: slots that decoded eagerly
    take the fixed (compiled) step between two steps, with sessions mid-segment, and go on
    with the logits and states each session gives alone."""
    model = variant_model(variant)
    slots = Slots(model, 4, compile=False)
    ref = {"a": read_state(model, 3, 1), "b": read_state(model, 14, 2)}
    handle = {name: slots.add(s) for name, s in ref.items()}
    g = torch.Generator().manual_seed(3)
    for i in range(24):
        if i == 9:
            slots.compiled, slots.backend = True, "eager"
        tokens = torch.randint(1, 500, (2,), generator=g)
        logits = slots.step([handle["a"], handle["b"]], tokens)
        for row, name in enumerate(("a", "b")):
            with torch.no_grad():
                alone, ref[name] = model(tokens[row].view(1, 1), ref[name])
            torch.testing.assert_close(logits[row], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert slots.compiled and slots._shapes, "the fixed step never ran"
    for name, h in handle.items():
        assert_states_close(slots.state(h), ref[name])


def check_batched(model: Any, slots: Slots) -> None:
    """Sessions at different positions, one joining and one leaving mid-way, rows in any
    order: each row's logits are what the eager model gives that session alone."""
    ref = {"a": read_state(model, 3, 1), "b": read_state(model, 14, 2)}
    handle = {name: slots.add(s) for name, s in ref.items()}
    late = read_state(model, 40, 4)
    decode_rows_like_alone(model, slots, handle, ref, late, join="c", join_at=4, leave_at=12)
    assert ref["b"].position > 32
    for name, h in handle.items():
        assert_states_close(slots.state(h), ref[name])
    assert slots.compiled, "fell back to eager: nothing compared"


def counting_backend() -> tuple[list[int], Any]:
    """A torch.compile backend that runs graphs as traced and records each one it is given
    (its node count): how many times a step compiled."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    return graphs, counting


def test_one_graph_serves_every_token() -> None:
    """Positions, segment ends and open-segment lengths change every token; the compiled
    graph does not: one compile for a one-row step over 50 tokens (the KV buffer of an
    unwindowed pythia layer grows once: one more)."""
    graphs, counting = counting_backend()
    model = variant_model("pythia-no-window")
    slots = Slots(model, 1, compile=True, backend=counting)
    decode_alone(model, read_state(model, 10, 1), slots, 50)  # capacity 64 -> 128 at position 63
    assert 1 <= len(graphs) <= 2, graphs
    model = make_tiny_model("tiny-infini", init_std=0.1)
    graphs.clear()
    slots = Slots(model, 1, compile=True, backend=counting)
    decode_alone(model, read_state(model, 10, 1), slots, 50)
    assert len(graphs) == 1, graphs


def test_buffers_grow_by_an_eighth_past_the_doubling_range() -> None:
    """A compiled step reads a KV buffer at its whole capacity, so past
    `GROW_DOUBLING_UP_TO` a buffer grows by an eighth (rounded to `GROW_QUANTUM`), not by
    doubling: the spare part stays under an eighth plus a quantum."""
    assert [grown_capacity(c, c + 1) for c in (0, 16, 100, 512)] == [16, 32, 200, 1024]
    assert grown_capacity(1024, 1025) == 1152 and grown_capacity(1152, 1153) == 1408
    assert grown_capacity(64, 5000) >= 5000  # one call reaches any need
    for needed in range(1025, 40_000, 997):
        cap = grown_capacity(1024, needed)
        assert needed <= cap < needed + needed // 8 + GROW_QUANTUM + 1, (needed, cap)
        assert cap % GROW_QUANTUM == 0


def test_many_buffer_growths_share_one_dynamic_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unwindowed pythia layer's buffer grows every few tokens here (by an eighth,
    rounded to 8, from its first 64): the compiled step keeps the eager logits, and after the
    first two capacities one graph with a dynamic capacity serves the rest."""
    monkeypatch.setattr(common, "GROW_DOUBLING_UP_TO", 16)
    monkeypatch.setattr(common, "GROW_QUANTUM", 8)
    graphs, counting = counting_backend()
    model = variant_model("pythia-no-window")
    slots = Slots(model, 1, compile=True, backend=counting)
    capacities = set()
    handle = slots.add(read_state(model, 10, 1))
    for token in range(150):
        slots.step([handle], [token % 400 + 1])
        capacities.update(b.k.shape[2] for b in slots.layers if isinstance(b, KVSlots))
    assert len(capacities) >= 6, capacities  # 64, 72, 88, 104, 120, 136, 160
    assert 1 <= len(graphs) <= 2, graphs
    slots.discard(handle)
    decode_alone(model, read_state(model, 10, 1), slots, 60)  # the same logits as eager


def test_compile_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEWLLM_COMPILE", raising=False)
    assert compile_enabled() is False and compile_enabled(default=True) is True
    assert compile_enabled(True) is True and compile_enabled(False, default=True) is False
    monkeypatch.setenv("NEWLLM_COMPILE", "1")
    assert compile_enabled() is True and compile_enabled(False) is False
    monkeypatch.setenv("NEWLLM_COMPILE", "0")  # off whatever is asked
    assert compile_enabled(True, default=True) is False
    model = make_tiny_model("tiny-pythia")
    assert not Slots(model, 1, compile=True).compiled


def test_a_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(slots_module, "_FAILED", [])  # this test's failure stays here

    def broken(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        raise RuntimeError("no C++ compiler here")

    model = make_tiny_model("tiny-infini", init_std=0.1)
    slots = Slots(model, 1, compile=True, backend=broken)
    decode_alone(model, read_state(model, 12, 1), slots, 8)  # right logits all the same
    assert not slots.compiled and "no C++ compiler" in slots_module._FAILED[0]
    assert "decoding eagerly" in caplog.text
    assert not compile_enabled(True)  # nor is it tried again in this process


def test_a_cpp_wrapper_failure_falls_back_to_the_python_wrapper(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(slots_module, "_FAILED", [])
    monkeypatch.setattr(slots_module, "_CPP_WRAPPER_FAILED", [])  # this test's failure stays here
    monkeypatch.delenv("NEWLLM_CPP_WRAPPER", raising=False)
    # what inductor raises when the C++ wrapper's code does not build
    boom = type("CppCompileError", (RuntimeError,), {"__module__": "torch._inductor.exc"})
    real, asked = slots_module.compiled_forward, []

    def forward(model: Any, backend: Any = "inductor", cpp: bool = False) -> Any:
        asked.append(cpp)
        if not cpp:
            return real(model, backend, cpp)

        def fail(*args: Any) -> Any:
            raise boom("the C++ wrapper does not build here")
        return fail

    monkeypatch.setattr(slots_module, "compiled_forward", forward)
    model = make_tiny_model("tiny-infini", init_std=0.1)
    assert slots_module.cpp_wrapper(model)  # the default on the CPU
    slots = Slots(model, 1, compile=True)
    decode_alone(model, read_state(model, 12, 1), slots, 8)  # the eager logits, compiled
    assert slots.compiled and asked[0] is True and set(asked[1:]) == {False}
    assert "does not build" in slots_module._CPP_WRAPPER_FAILED[0]
    assert "trying its Python wrapper" in caplog.text
    assert not slots_module.cpp_wrapper(model)  # not tried again in this process
    monkeypatch.setattr(slots_module, "_CPP_WRAPPER_FAILED", [])
    monkeypatch.setenv("NEWLLM_CPP_WRAPPER", "0")  # an operator's switch
    assert not slots_module.cpp_wrapper(model)
