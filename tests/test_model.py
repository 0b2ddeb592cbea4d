"""The model's core contracts: any split equals one shot, states are values that match their
declared shapes and the closed-form sizes, batched decoding equals separate calls."""

from __future__ import annotations

import pytest
import torch
from tiny import make

from newllm import ModelConfig, TransformerLM, create_model
from newllm.layers.context_kv import visible_contexts
from newllm.sizes import layer_state_values, state_bytes

TINY = ["tiny-pythia", "tiny-infini", "tiny-multi-memory", "tiny-hierarchical",
        "tiny-context-pythia", "tiny-context-kv"]




def feed(model: TransformerLM, ids: torch.Tensor, splits: list[int]) -> torch.Tensor:
    state, outs, start = None, [], 0
    for n in splits:
        logits, state = model(ids[:, start:start + n], state)
        outs.append(logits)
        start += n
    assert start == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", TINY)
def test_any_split_equals_one_shot(name: str) -> None:
    model = make(name)
    torch.manual_seed(1)
    T = 61  # segment_len 16, chunk 8: crosses several boundaries
    ids = torch.randint(0, 500, (2, T))
    with torch.no_grad():
        whole = feed(model, ids, [T])
        uneven = feed(model, ids, [5, 0, 11, 1, 20, 0, 3, 21])  # empty pieces too
        by_token = feed(model, ids, [1] * T)
    torch.testing.assert_close(uneven, whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(by_token, whole, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_states_are_values_and_match_declared_shapes(name: str) -> None:
    model = make(name)
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        _, s20 = model(ids[:, :20])
        snapshot = {k: v.clone() for k, v in s20.flat_tensors().items()}
        a, _ = model(ids[:, 20:], s20)
        b, _ = model(ids[:, 20:30], s20)  # branch again from the same state
    for k, v in s20.flat_tensors().items():
        assert torch.equal(v, snapshot[k]), f"forward mutated the input state ({k})"
    torch.testing.assert_close(a[:, :10], b)
    for position in (0, 1, 15, 16, 17, 40):
        with torch.no_grad():
            _, s = model(ids[:, :position]) if position else (None, model.init_state(1))
        shapes = {k: tuple(v.shape) for k, v in s.flat_tensors().items()}
        assert shapes == model.state_shapes(1, position)
        assert s.position == position


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("position", [0, 7, 16, 50])
def test_state_bytes_follow_the_closed_form(name: str, position: int) -> None:
    model = make(name)
    with torch.no_grad():
        _, s = model(torch.randint(0, 500, (2, position))) if position else (
            None, model.init_state(2))
    assert s.nbytes() == state_bytes(model.config, position, batch_size=2)


def test_memory_kinds_stay_bounded_while_pythia_grows() -> None:
    cfg = ModelConfig.from_name("tiny-infini")
    S = cfg.segment_len
    for kind in ("pythia", "infini", "multi_memory", "hierarchical", "context_kv"):
        at = [layer_state_values(cfg, kind, k * S) for k in (1, 4, 16)]
        if kind == "pythia":
            assert at == [0, 0, 0]  # segment-local in memory models
            glob = ModelConfig.from_name("tiny-pythia")
            assert layer_state_values(glob, kind, 16 * S) == 16 * layer_state_values(glob, kind, S)
        elif kind == "context_kv":
            glob = ModelConfig.from_name("tiny-pythia")
            assert at[0] < at[1] < at[2] < layer_state_values(glob, "pythia", 16 * S) / 4
        else:
            assert at[0] == at[1] == at[2]  # constant at segment boundaries
            assert max(layer_state_values(cfg, kind, p) for p in range(16 * S)) < 2 * at[0]


@pytest.mark.parametrize("name", ["infini-70m", "multi-memory-70m", "hierarchical-70m"])
def test_memory_presets_whole_state_is_bounded(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    sizes = [state_bytes(cfg, p) for p in (512, 16384, 65536)]
    assert sizes[0] == sizes[1] == sizes[2]
    # between segment ends only the open segment (< S tokens of keys/values) comes on top
    pythia = ModelConfig.from_name("pythia-70m")
    bound = sizes[0] + state_bytes(pythia, cfg.segment_len)
    assert max(state_bytes(cfg, p) for p in range(0, 4 * cfg.segment_len, 7)) < bound


def test_context_pythia_kv_cache_is_half_of_pythias() -> None:
    pythia = ModelConfig.from_name("pythia-70m")
    ctx = ModelConfig.from_name("context-pythia-70m")
    for p in (2048, 16384):
        kv = state_bytes(ctx, p) - 4 * ctx.context_dim  # minus the context block's context
        assert kv * 2 == state_bytes(pythia, p)


def test_context_kv_visibility() -> None:
    assert visible_contexts(350, 100) == 4
    assert visible_contexts(99, 100) == 1
    assert visible_contexts(100, 100) == 2
    # and the layer really attends to that many: its cache after 350 tokens has 3 chunk ends
    model = make("tiny-context-kv", chunk_size=100)
    with torch.no_grad():
        _, s = model(torch.randint(0, 500, (1, 350)))
    assert s.layers[0].k.shape[-2] == 3  # + the token's own context = 4


@pytest.mark.parametrize("name", TINY)
def test_decode_step_equals_separate_calls(name: str) -> None:
    model = make(name)
    states = []
    with torch.no_grad():
        for n in (3, 16, 29):
            _, s = model(torch.randint(0, 500, (1, n)))
            states.append(s)
        tokens = torch.tensor([7, 8, 9])
        logits, new = model.decode_step(tokens, states)
        for i, s in enumerate(states):
            ref, ref_state = model(tokens[i].view(1, 1), s)
            torch.testing.assert_close(logits[i], ref[0, -1], atol=2e-5, rtol=1e-5)
            assert new[i].position == ref_state.position
            for k, v in ref_state.flat_tensors().items():
                torch.testing.assert_close(new[i].flat_tensors()[k], v, atol=2e-5, rtol=1e-5)


def test_a_changed_copy_of_a_state_continues_from_its_own_values() -> None:
    """A state rebuilt with other tensors must not write into the original's spare buffer."""
    import dataclasses

    model = make("tiny-pythia")
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        _, s = model(ids[:, :10])
        zeroed = dataclasses.replace(s.layers[0], k=torch.zeros_like(s.layers[0].k))
        s0 = type(s)(s.position, (zeroed,) + s.layers[1:], s.context)
        a, _ = model(ids[:, 10:], s)
        b, _ = model(ids[:, 10:], s0)
        half = s.to(dtype=torch.float16).to(dtype=torch.float32)
        c, _ = model(ids[:, 10:], half)
        fresh = type(s)(half.position, tuple(
            dataclasses.replace(ls, k=ls.k.clone(), v=ls.v.clone(), _spare=None)
            for ls in half.layers), None)
        d, _ = model(ids[:, 10:], fresh)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_create_model_accepts_the_seeds_options() -> None:
    m = create_model("infini", size="tiny", num_memory_banks=2, use_delta_rule=False)
    assert m.config.num_memory_banks == 2 and not m.config.use_delta_rule
    assert create_model("pythia").num_parameters() == 70_426_624  # Pythia-70M exactly
    mixed = TransformerLM(ModelConfig.from_name(
        "tiny-pythia", layers=("multi_memory", "infini", "pythia")))
    with torch.no_grad():
        logits, _ = mixed(torch.randint(0, 500, (1, 40)))
    assert logits.shape == (1, 40, 512)
    with pytest.raises(ValueError, match="unknown model kind"):
        create_model("infinni")


def test_config_errors_name_the_problem_and_round_trip(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown layer type 'infinni'"):
        ModelConfig(layers=("infinni",))
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_name("pythia-7b")
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=100, num_heads=8)
    with pytest.raises(ValueError, match="unknown config keys"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="context_kv"):
        ModelConfig(layers=("context_kv",))
    cfg = ModelConfig.from_name("tiny-hierarchical", num_memories=3)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


def test_gradients_flow_through_memory_across_segments() -> None:
    """A loss on segment 2 must reach the parameters through segment 1's memory write."""
    model = make("tiny-infini")
    model.train()
    ids = torch.randint(0, 500, (1, 32))
    _, s = model(ids[:, :16])  # one full segment -> written into memory
    logits, _ = model(ids[:, 16:], s)
    logits.sum().backward()
    gate = model.layers[0].attention.gate
    assert gate.grad is not None and gate.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny-infini", "tiny-multi-memory", "tiny-hierarchical"])
def test_memory_key_shift_keeps_splits_exact_and_is_off_at_weight_zero(name: str) -> None:
    shifted = make(name, memory_key_shift=True)
    torch.manual_seed(1)
    ids = torch.randint(0, 500, (2, 53))
    with torch.no_grad():
        whole = feed(shifted, ids, [53])
        torch.testing.assert_close(feed(shifted, ids, [3, 14, 1, 0, 35]), whole,
                                   atol=2e-5, rtol=1e-5)
        plain = make(name)
        assert not torch.allclose(feed(plain, ids, [53]), whole, atol=1e-4)  # the shift matters
        for layer in shifted.layers:
            if hasattr(layer.attention, "key_shift"):
                layer.attention.key_shift.zero_()
        torch.testing.assert_close(feed(shifted, ids, [53]), feed(plain, ids, [53]))


@pytest.mark.parametrize("option,layer,weight,keys", [
    ("memory_key_shift", 0, "key_shift", "memory_keys"),  # the infini layer's memory keys
    ("attention_key_shift", 1, "local_key_shift", "shifted_keys"),  # the pythia layer's keys
])
def test_key_shifts_add_the_previous_key_of_the_segment(option: str, layer: int, weight: str,
                                                        keys: str) -> None:
    attn = make("tiny-infini", **{option: True}).layers[layer].attention
    with torch.no_grad():
        getattr(attn, weight).fill_(0.5)
    k = torch.randn(2, 4, 16, 16)  # (B, H, S, D): a segment's keys from its first token
    mk = getattr(attn, keys)(k)
    torch.testing.assert_close(mk[:, :, 0], k[:, :, 0])  # no predecessor in the segment
    torch.testing.assert_close(mk[:, :, 1:], k[:, :, 1:] + 0.5 * k[:, :, :-1])
    assert make("tiny-infini").layers[1].attention.shifted_keys(k) is k  # off: untouched


@pytest.mark.parametrize("name,local", [("tiny-infini", True), ("tiny-pythia", False)])
def test_attention_key_shift_keeps_splits_exact_and_is_off_at_weight_zero(name: str,
                                                                          local: bool) -> None:
    """Smeared keys in pythia layers: one piece, uneven pieces and token by token agree (the
    shift reads the cached plain keys, from the segment's start with segment_local), and at
    weight 0 the model is the plain one."""
    model = make_with_random(name, ("local_key_shift",), 0.5, attention_key_shift=True,
                             segment_local=local)
    ids = torch.randint(0, 500, (2, 53))
    with torch.no_grad():
        whole = splits_agree(model, ids)
        plain = make(name, segment_local=local)
        assert not torch.allclose(feed(plain, ids, [53]), whole, atol=1e-4)  # the shift matters
        shifts = [p for n, p in model.named_parameters() if n.endswith("local_key_shift")]
        assert len(shifts) == sum(kind == "pythia" for kind in model.config.layers)
        for p in shifts:
            p.zero_()
        torch.testing.assert_close(feed(model, ids, [53]), feed(plain, ids, [53]))


def test_fingerprint_is_stable_across_releases_for_models_without_new_options() -> None:
    """Memory files name their model by fingerprint: an option added later (at its default)
    must not change it, or every memory file saved before would be refused."""
    import json

    from newllm.config import FINGERPRINT_LATER_FIELDS

    cfg = ModelConfig.from_name("tiny-infini")
    hashed = json.loads(cfg.fingerprint_json())
    assert set(json.loads(cfg.to_json())) - set(hashed) == set(FINGERPRINT_LATER_FIELDS)
    torch.manual_seed(0)
    # the value the first release computed for this model (tiny-infini, seed 0)
    assert TransformerLM(cfg).fingerprint() == \
        "cd7191df7959c66d57618b525bfa5b0fdbf47293a82cf8387e4af2abb15e3f8b"
    shifted = cfg.replace(memory_key_shift=True)
    assert "memory_key_shift" in json.loads(shifted.fingerprint_json())


@pytest.mark.parametrize("name", TINY)
def test_input_major_weights_change_the_memory_order_only(name: str, tmp_path) -> None:
    from newllm.checkpoint import from_pretrained, save_pretrained

    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = model.fingerprint()
    assert not model.weights_input_major()
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        ref, ref_state = model(ids)
        ref_step, _ = model(ids[:, :1], ref_state)
        assert model.use_input_major_weights() is model
        assert model.weights_input_major()
        head = model.embed_out.weight
        assert not head.is_contiguous() and head.t().is_contiguous()
        for k, v in model.state_dict().items():  # same values, names and shapes
            assert torch.equal(v, before[k]), k
        assert model.fingerprint() == fingerprint
        logits, state = model(ids)
        step, _ = model(ids[:, :1], state)
    # a different summation order: equal up to float rounding, not bit for bit
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(step, ref_step, atol=2e-5, rtol=1e-5)
    save_pretrained(model, tmp_path / "ckpt")  # saved contiguous; loads in the default order
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.fingerprint() == fingerprint and not loaded.weights_input_major()
    model.half()  # a dtype change keeps the order
    assert model.weights_input_major()


def test_input_major_weights_still_train() -> None:
    model = make("tiny-infini").use_input_major_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 500, (2, 33))
    losses = []
    for _ in range(3):
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert model.weights_input_major()


def test_rotary_tables_made_under_inference_mode_serve_autograd_later() -> None:
    """Angle tables are shared between layers and calls; one first built inside
    `torch.inference_mode` must not break a later forward that needs gradients."""
    model = make("tiny-pythia")
    ids = torch.randint(0, 500, (1, 7))
    with torch.inference_mode():
        ref, _ = model(ids)
    logits, _ = model(ids)  # the same positions: the cached tables
    logits.sum().backward()
    torch.testing.assert_close(logits.detach(), ref)
    assert model.layers[0].attention.query_key_value.weight.grad is not None


def make_with_random(name: str, suffixes: tuple[str, ...], std: float,
                     **overrides: object) -> TransformerLM:
    """`make`, then the parameters whose names end with ``suffixes`` drawn from N(0, std²)."""
    model = make(name, **overrides)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(suffixes):
                p.normal_(0.0, std)
    return model


def splits_agree(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ids (B, 53) read in one piece, checked against uneven pieces and token by token."""
    whole = feed(model, ids, [53])
    torch.testing.assert_close(feed(model, ids, [3, 14, 1, 0, 35]), whole, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(feed(model, ids, [1] * 53), whole, atol=2e-5, rtol=1e-5)
    return whole


@pytest.mark.parametrize("name", ["tiny-infini", "tiny-multi-memory", "tiny-hierarchical"])
def test_memory_write_gate_keeps_splits_exact_and_its_limits_are_the_plain_rules(
        name: str) -> None:
    gated = make_with_random(name, ("write_gate", "write_gate_bias"), 0.3,
                             memory_write_gate=True)
    ids = torch.randint(0, 500, (2, 53))
    with torch.no_grad():
        whole = splits_agree(gated, ids)
        plain = make(name)
        assert not torch.allclose(feed(plain, ids, [53]), whole, atol=1e-4)  # β matters
        weights = [p for n, p in gated.named_parameters() if n.endswith("write_gate")]
        biases = [p for n, p in gated.named_parameters() if n.endswith("write_gate_bias")]
        for w, b in zip(weights, biases, strict=True):
            w.zero_()
            b.fill_(40.0)  # β = 1 in float32: the plain delta rule
        torch.testing.assert_close(feed(gated, ids, [53]), feed(plain, ids, [53]))
        # a uniform β scales M and z alike, which the linear rule's read cancels
        lin_gated = make(name, memory_write_gate=True, use_delta_rule=False)
        lin_plain = make(name, use_delta_rule=False)
        torch.testing.assert_close(feed(lin_gated, ids, [53]), feed(lin_plain, ids, [53]),
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-infini", "tiny-multi-memory", "tiny-hierarchical"])
def test_memory_history_keeps_splits_exact_and_reduces_to_the_shift(name: str) -> None:
    model = make_with_random(name, ("key_history", "query_history"), 0.5, memory_history=3)
    ids = torch.randint(0, 500, (2, 53))
    with torch.no_grad():
        whole = splits_agree(model, ids)
        shifted = make(name, memory_key_shift=True)
        assert not torch.allclose(feed(shifted, ids, [53]), whole, atol=1e-4)
        for n, p in model.named_parameters():  # the first key weight alone: the shift
            if n.endswith("key_history") and not n.endswith("query_history"):
                p.zero_()
                p[:, 0] = 1.0
            if n.endswith("query_history"):
                p.zero_()
        torch.testing.assert_close(feed(model, ids, [53]), feed(shifted, ids, [53]))


def test_memory_history_adds_earlier_keys_of_the_segment_only() -> None:
    attn = make("tiny-infini", memory_history=2).layers[0].attention
    with torch.no_grad():
        attn.key_history.copy_(torch.tensor([0.5, 0.25]).view(1, 2, 1).expand_as(attn.key_history))
        attn.query_history.fill_(2.0)
    k = torch.randn(1, 4, 16, 16)  # (B, H, S, D)
    mk = attn.memory_keys(k)
    torch.testing.assert_close(mk[:, :, 0], k[:, :, 0])
    torch.testing.assert_close(mk[:, :, 1], k[:, :, 1] + 0.5 * k[:, :, 0])
    torch.testing.assert_close(mk[:, :, 2:],
                               k[:, :, 2:] + 0.5 * k[:, :, 1:-1] + 0.25 * k[:, :, :-2])
    q = torch.randn(1, 4, 3, 16)  # tokens 5, 6, 7 of the segment
    mq = attn.memory_queries(q, k[:, :, :8], 5)
    torch.testing.assert_close(mq, q + 2.0 * k[:, :, 4:7] + 2.0 * k[:, :, 3:6])
    with pytest.raises(ValueError, match="not both"):
        ModelConfig.from_name("tiny-infini", memory_history=2, memory_key_shift=True)
    # memory_key_self=false: the previous tokens' keys alone (the first token's key is 0)
    noself = make("tiny-infini", memory_history=2, memory_key_self=False).layers[0].attention
    with torch.no_grad():
        noself.key_history.copy_(attn.key_history)
    mk = noself.memory_keys(k)
    torch.testing.assert_close(mk[:, :, 0], torch.zeros_like(k[:, :, 0]))
    torch.testing.assert_close(mk[:, :, 2:], 0.5 * k[:, :, 1:-1] + 0.25 * k[:, :, :-2])
    with pytest.raises(ValueError, match="memory_history"):
        ModelConfig.from_name("tiny-infini", memory_key_self=False)


def test_recall_toy_script_builds_its_trials_and_writes_a_curve(tmp_path) -> None:
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "recall_toy.py"
    spec = importlib.util.spec_from_file_location("recall_toy", path)
    assert spec is not None and spec.loader is not None
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    gen = torch.Generator().manual_seed(0)
    S = 16
    seq = toy.trials(64, segment=S, gap=1, cue=[1, 2, 3], answer=4, common=0.5, gen=gen)
    assert seq.shape == (64, 3 * S)
    assert (seq[:, -7:-4] == torch.tensor([1, 2, 3])).all()  # the question's cue
    for row in seq:  # the fact sits in segment 0 with the same answer
        starts = [i for i in range(S - 3) if row[i:i + 3].tolist() == [1, 2, 3]]
        assert any(row[p + 3:p + 7].tolist() == row[-4:].tolist() for p in starts)
    assert (seq[:, S:2 * S] == 3).float().mean() > 0.3  # the common cue token in the filler
    out = tmp_path / "toy.json"
    assert toy.main(["--steps", "2", "--eval-every", "1", "--batch-size", "4", "--segment", "8",
                     "--model-options", "memory_history=2", "--out", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [r["step"] for r in curve] == [1, 2]
    assert all(0 <= r["exact"] <= r["first_token"] <= 1 for r in curve)
