"""The pointer cache (`newllm.pointer`): the chunked forward against the token-by-token
reference (with and without the gate's inputs), in pieces and with ``last_only``; decode_step;
the targets-only scoring against the forward (values and gradients, in the trainer too); a
failed slot step undone; memory files that carry it (and refuse negative masses); the config's
checks; a model without it unchanged; and training only the pointer from the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, read_state, variant_model
from test_memory_file import refused, resave

from newllm.config import ModelConfig
from newllm.memory_file import ValueRangeError, load_memory, save_memory
from newllm.model import TransformerLM
from newllm.pointer import CHUNK, pointer_reference
from newllm.slots import Slots
from newllm.state import ModelState


def pointer_model(token_keys: bool, gate_inputs: tuple[str, ...] = (),
                  span: int = 1, delay: int = 0) -> TransformerLM:
    model = make_tiny_model("tiny-infini", init_std=0.1, pointer_dim=8,
                            pointer_token_keys=token_keys, pointer_gate_inputs=gate_inputs,
                            pointer_span=span, pointer_delay=delay)
    with torch.no_grad():
        model.pointer.mix_gate.bias.zero_()  # half of every prediction from the pointer
        if model.pointer.gate_read is not None:  # and the gate's inputs matter
            model.pointer.gate_read.copy_(torch.linspace(0.8, 1.6, len(gate_inputs)))
        if model.pointer.span_gate is not None:  # the span's reads too
            model.pointer.span_gate.bias.copy_(torch.linspace(-0.5, 0.5, span - 1))
        if model.pointer.span_read is not None:
            model.pointer.span_read.copy_(torch.linspace(0.5, 1.5, model.pointer.span_read.numel())
                                          .view_as(model.pointer.span_read))
    return model


def hidden_of(model: TransformerLM, ids: torch.Tensor, state: Any = None) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = model.final_layer_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(ids, state)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize(("token_keys", "gate_inputs", "span", "delay"), [
    (False, (), 1, 0), (True, (), 1, 0), (False, ("focus",), 1, 0), (False, ("momentum",), 1, 0),
    (True, ("momentum", "focus"), 1, 0), (False, (), 3, 0), (False, ("focus", "momentum"), 2, 0),
    (True, ("focus", "momentum"), 4, 0), (False, ("focus", "momentum"), 1, 6),
    (True, ("focus", "momentum"), 3, 9)])
def test_forward_equals_the_token_by_token_reference(token_keys: bool,
                                                     gate_inputs: tuple[str, ...],
                                                     span: int, delay: int) -> None:
    model = pointer_model(token_keys, gate_inputs, span, delay)
    # few distinct tokens: every token has earlier copies to point at
    ids = torch.randint(1, 12, (1, CHUNK + 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = model(ids)
        hidden = hidden_of(model, ids)[0]
        ref = pointer_reference(model.pointer, hidden, model.embed_in(ids[0]), ids[0],
                                model.embed_out(hidden), model.init_state(1).pointer, False)
        torch.testing.assert_close(logits[0], ref, atol=2e-5, rtol=1e-5)
        plain = torch.log_softmax(model.embed_out(hidden), -1)
        assert (logits[0, 1:] - plain[1:]).abs().max() > 0.1  # the pointer matters here
        torch.testing.assert_close(logits[0, 0], plain[0])  # nothing to point at yet
        if span > 1:  # the reads after the next token matter too
            assert model.pointer.span_gate is not None
            bias = model.pointer.span_gate.bias.clone()
            model.pointer.span_gate.bias.fill_(-1e4)
            first, _ = model(ids)
            model.pointer.span_gate.bias.copy_(bias)
            assert (first - logits).abs().max() > 0.1
        # in pieces (a state carried across a chunk boundary), and the last position only
        a, mid = model(ids[:, :CHUNK - 5])
        b, after = model(ids[:, CHUNK - 5:], mid)
        torch.testing.assert_close(torch.cat((a, b), 1), logits, atol=2e-5, rtol=1e-5)
        for name, t in state.flat_tensors().items():
            torch.testing.assert_close(after.flat_tensors()[name], t, atol=1e-4, rtol=1e-5)
        last, _ = model(ids[:, CHUNK - 5:], mid, last_only=True)
        torch.testing.assert_close(last[0, -1], logits[0, -1], atol=2e-5, rtol=1e-5)
        # decode_step: several sessions at different positions, each as alone
        states = [read_state(model, n, n) for n in (3, 17, 40)]
        tokens = torch.tensor([4, 5, 6])
        step, _ = model.decode_step(tokens, states)
        for i, s in enumerate(states):
            alone, _ = model(tokens[i].view(1, 1), s)
            torch.testing.assert_close(step[i], alone[0, -1], atol=2e-5, rtol=1e-5)
    assert tuple(state.pointer.mass.shape) == (1, 8, model.config.vocab_size)
    assert float(state.pointer.mass.min()) >= 0
    # the masses written sum to the normaliser
    torch.testing.assert_close(state.pointer.mass.sum(-1), state.pointer.z)


@pytest.mark.parametrize(("gate_inputs", "span", "delay"), [
    ((), 1, 0), (("focus", "momentum"), 1, 0), (("focus", "momentum"), 3, 0),
    (("focus", "momentum"), 2, 5)])
def test_scoring_the_targets_alone_equals_the_forward(gate_inputs: tuple[str, ...],
                                                      span: int, delay: int) -> None:
    """`score_targets` (what training uses) gives the forward's log-probabilities at the
    targets, in values and in the gradients of the pointer's weights, across chunks and
    from a carried state; the trainer's loss is the same either way."""
    from training.lm import forward_backward

    model = pointer_model(False, gate_inputs, span, delay)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(1, 12, (2, CHUNK + 61), generator=g)
    ids, targets = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        _, mid = model(torch.randint(1, 12, (2, 40), generator=g))

    def grads(use_targets: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        if use_targets:
            lp, _ = model(ids, mid, targets=targets)
        else:
            logits, _ = model(ids, mid)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.pointer.named_parameters()}

    lp_fast, g_fast = grads(True)
    lp_full, g_full = grads(False)
    torch.testing.assert_close(lp_fast, lp_full, atol=2e-5, rtol=1e-5)
    for name, grad in g_full.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(g_fast[name], grad, atol=1e-4, rtol=1e-4)
    # the trainer: the same loss with the targets scored alone as with full logits
    fb = lambda x, s, **kw: model(x, s, **kw)  # noqa: E731
    full, per_full = forward_backward(fb, batch, 128, backward=False)
    fast, per_fast = forward_backward(fb, batch, 128, backward=False, targets_only=True)
    assert abs(full - fast) < 1e-5
    torch.testing.assert_close(per_fast, per_full, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=targets[:, :-1])


@pytest.mark.parametrize(("span", "delay"), [(1, 0), (3, 0), (1, 4), (3, 7)])
def test_the_state_of_a_whole_read_in_one_write(span: int, delay: int) -> None:
    """`PointerCache.state_of` (one write per depth, for training's long prefixes) leaves the
    state the chunked forward leaves."""
    model = pointer_model(True, ("focus", "momentum"), span, delay)
    ids = torch.randint(1, 12, (2, CHUNK + 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, state = model(ids)
        hidden, embedded, _ = model.hidden_states(ids)
        built = model.pointer.state_of(model.pointer.inputs(hidden, embedded), ids)
    got = ModelState(0, (), None, built).flat_tensors()
    want = ModelState(0, (), None, state.pointer).flat_tensors()
    assert set(got) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, atol=1e-4, rtol=1e-5)


def test_a_pointer_added_and_removed() -> None:
    from newllm.pointer import add_pointer, remove_pointer, widen_span, with_delay

    base = make_tiny_model("tiny-infini")
    ids = torch.randint(1, 50, (1, 30), generator=torch.Generator().manual_seed(4))
    added = add_pointer(base, 8, gate_inputs=("focus",))
    assert added.config.pointer_dim == 8 and added.config.pointer_gate_inputs == ("focus",)
    with pytest.raises(ValueError, match="already has a pointer"):
        add_pointer(added)
    removed = remove_pointer(added)
    assert removed.pointer is None and removed.fingerprint() == base.fingerprint()
    with torch.no_grad():
        plain, _ = base(ids)
        torch.testing.assert_close(removed(ids)[0], plain)
        mixed, _ = added(ids)  # the pointer's log-probabilities: the model's where it is empty
        torch.testing.assert_close(mixed[0, 0], torch.log_softmax(plain[0, 0], -1))
    # a span added to a trained pointer: its other weights kept, the new reads nearly closed
    wide = widen_span(added, 3)
    assert wide.config.pointer_span == 3 and wide.pointer.span_gate is not None
    assert torch.equal(wide.pointer.query.weight, added.pointer.query.weight)
    with torch.no_grad():
        spanned, state = wide(ids)
    assert float((spanned.exp() - mixed.exp()).abs().max()) < 0.01
    assert tuple(state.pointer.span_mass.shape) == (1, 2, 8, base.config.vocab_size)
    with pytest.raises(ValueError, match="span 1"):
        widen_span(wide, 4)
    with pytest.raises(ValueError, match="span must be >= 2"):
        widen_span(added, 1)
    assert remove_pointer(wide).fingerprint() == base.fingerprint()
    delayed = with_delay(added, 6)  # the same weights; only pairs 6 tokens old are read
    assert delayed.config.pointer_delay == 6
    with torch.no_grad():
        late, _ = delayed(ids)
    torch.testing.assert_close(late[0, :6], torch.log_softmax(plain[0, :6], -1))
    assert (late[0, 6:] - mixed[0, 6:]).abs().max() > 0  # the nearest pairs are not read
    with pytest.raises(ValueError, match="with a pointer"):
        with_delay(base, 6)
    assert remove_pointer(with_delay(widen_span(added, 2), 6)).fingerprint() == base.fingerprint()
    warm = widen_span(added, 3, warm=True)  # the new gates start as the first read's
    assert torch.equal(warm.pointer.span_gate.weight[1], added.pointer.mix_gate.weight[0])
    assert torch.equal(warm.pointer.span_read[1], added.pointer.gate_read)


@pytest.mark.parametrize("variant", ["infini-pointer", "infini-pointer-span",
                                     "infini-pointer-span-delay", "infini-pointer-delay"])
def test_a_failed_slot_step_undoes_the_pointers_writes(monkeypatch: pytest.MonkeyPatch,
                                                       variant: str) -> None:
    model = variant_model(variant)
    slots = Slots(model, 2, compile=False)
    states = [read_state(model, 9, 1), read_state(model, 20, 2)]
    handles = [slots.add(s) for s in states]
    import newllm.pointer as pointer

    # the mixture fails after the step has written the pairs
    monkeypatch.setattr(pointer, "mix_log", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        slots.step(handles, torch.tensor([4, 5]))
    for h, s in zip(handles, states, strict=True):
        got = slots.state(h).flat_tensors()
        for name, t in s.flat_tensors().items():
            assert torch.equal(got[name], t), name
    monkeypatch.undo()
    logits = slots.step(handles, torch.tensor([4, 5]))
    with torch.no_grad():
        for i, s in enumerate(states):
            alone, _ = model(torch.tensor([[4 + i]]), s)
            torch.testing.assert_close(logits[i], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["infini-pointer", "infini-pointer-span",
                                     "infini-pointer-span-delay", "infini-pointer-delay"])
def test_memory_files_carry_the_pointer_and_refuse_negative_masses(variant: str) -> None:
    model = variant_model(variant)
    state = read_state(model, 30, 3)
    data = save_memory(state, model)
    loaded = load_memory(data, model)
    for name, t in state.flat_tensors().items():
        assert torch.equal(loaded.flat_tensors()[name], t), name
    assert {"pointer.mass", "pointer.z", "pointer.last"} <= set(loaded.flat_tensors())
    with torch.no_grad():
        a, _ = model(torch.tensor([[3, 4, 5]]), state)
        b, _ = model(torch.tensor([[3, 4, 5]]), loaded)
    assert torch.equal(a, b)

    def negative(name: str) -> Any:
        def change(t: dict) -> None:
            t[name].view(-1)[7] = -1.0
        return change
    for name in (["pointer.mass", "pointer.span_mass", "pointer.span_keys"]
                 if model.config.pointer_span > 1 else ["pointer.mass"]):
        refused(resave(data, negative(name)), ValueRangeError, model, match=name)
    if model.config.pointer_delay:  # the pairs not yet written: token ids in the vocabulary
        def token(value: float) -> Any:
            def change(t: dict) -> None:
                t["pointer.span_tokens"].view(-1)[0] = value
            return change
        for value in (float(model.config.vocab_size), 2.5):
            refused(resave(data, token(value)), ValueRangeError, model, match="token ids")


def test_config_checks_and_models_without_a_pointer_keep_their_fingerprint() -> None:
    with pytest.raises(ValueError, match="pointer_dim"):
        ModelConfig.from_name("tiny-infini", pointer_dim=-1)
    with pytest.raises(ValueError, match="pointer_token_keys"):
        ModelConfig.from_name("tiny-infini", pointer_token_keys=True)
    with pytest.raises(ValueError, match="unknown pointer gate input 'size'"):
        ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_gate_inputs=["size"])
    with pytest.raises(ValueError, match="twice"):
        ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_gate_inputs=["focus"] * 2)
    with pytest.raises(ValueError, match="set pointer_dim"):
        ModelConfig.from_name("tiny-infini", pointer_gate_inputs=["focus"])
    with pytest.raises(ValueError, match="pointer_span must be >= 1"):
        ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_span=0)
    with pytest.raises(ValueError, match="leave pointer_span at 1"):
        ModelConfig.from_name("tiny-infini", pointer_span=2)
    spanned = ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_span=3)
    assert ModelConfig.from_dict(json.loads(spanned.to_json())) == spanned
    assert "pointer_span" in spanned.fingerprint_json()
    assert "pointer_span" not in spanned.replace(pointer_span=1).fingerprint_json()
    with pytest.raises(ValueError, match="pointer_delay must be >= 0"):
        ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_delay=-1)
    with pytest.raises(ValueError, match="leave pointer_delay at 0"):
        ModelConfig.from_name("tiny-infini", pointer_delay=8)
    assert "pointer_delay" in spanned.replace(pointer_delay=8).fingerprint_json()
    assert "pointer_delay" not in spanned.fingerprint_json()
    gated = ModelConfig.from_name("tiny-infini", pointer_dim=4, pointer_gate_inputs=["focus"])
    assert ModelConfig.from_dict(json.loads(gated.to_json())) == gated
    assert "pointer_gate_inputs" in gated.fingerprint_json()
    plain = ModelConfig.from_name("tiny-infini")
    assert "pointer" not in plain.fingerprint_json()
    assert "pointer_gate_inputs" not in plain.replace(pointer_dim=4).fingerprint_json()
    assert "pointer_dim" in plain.replace(pointer_dim=4).fingerprint_json()
    assert make_tiny_model("tiny-infini").pointer is None


def test_training_only_the_pointer_from_the_cli(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from newllm.checkpoint import load_checkpoint
    from training.cli import main

    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"word{i % 37} and the other{i % 11}." for i in range(2000)))
    out = tmp_path / "run"
    assert main(["train", "--init", str(tiny_checkpoint), "--out", str(out), "--data", str(text),
                 "--model-options", "pointer_dim=8", "pointer_token_keys=true",
                 "pointer_gate_inputs=[\"focus\", \"momentum\"]",
                 "--train-only", "pointer.*", "--steps", "3", "--batch-size", "2",
                 "--segments", "2", "--lr", "1e-2", "--cache-dir", "none",
                 "--eval-every", "0"]) == 0
    trained, _ = load_checkpoint(out)
    start, _ = load_checkpoint(tiny_checkpoint)
    assert trained.config.pointer_dim == 8 and trained.pointer is not None
    assert trained.config.pointer_gate_inputs == ("focus", "momentum")
    assert float(trained.pointer.gate_read.detach().abs().min()) > 0  # it learned to read both
    before = dict(start.named_parameters())
    for name, p in trained.named_parameters():
        if not name.startswith("pointer."):
            assert torch.equal(p, before[name].to(p.dtype)), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
