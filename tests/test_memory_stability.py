"""The stable delta rule (``memory_stable_delta``): its write against the slow reference (state
and gradients), the plain delta rule left bit for bit where the bound is not needed, the memory
kept from expanding over thousands of writes where the plain rule expands it, finite gradients
where a saturated write gate makes the plain rule's NaN, and models using it (forward, memory
files; the slot paths run it as a `VARIANTS` entry in conftest). Also the write gate's floor
(``memory_write_floor``; its slot paths: the banks-history-gate-floor variant)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_tiny_model

from newllm import ModelConfig
from newllm.layers.memory import (
    delta_step,
    elu1,
    memory_read_reference,
    memory_write,
    memory_write_reference,
)
from newllm.memory_file import ModelMismatchError, load_memory, save_memory

BOUNDED = {"memory_history": 2, "memory_write_gate": True, "memory_stable_delta": True,
           "memory_heads": 2}


def filled_memory(dk: int, dv: int, seed: int, scale: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sk = elu1(torch.randn(5, dk, generator=g, dtype=torch.float64)) * scale
    return sk.T @ torch.randn(5, dv, generator=g, dtype=torch.float64), sk.sum(0)


@pytest.mark.parametrize("gated", [False, True], ids=["sk", "gated-rk"])
@pytest.mark.parametrize("scale", [0.0, 0.01, 10.0], ids=["empty", "weak", "filled"])
def test_stable_write_matches_reference_with_gradients(scale: float, gated: bool) -> None:
    """A weakly written memory (small z) makes ‖G‖_F large: η well below 1. ``gated``: sk =
    β·σ(k) written, σ(k) retrieving (as the layers do)."""
    dk, dv, S, T = 6, 5, 7, 4
    g = torch.Generator().manual_seed(3)
    M0, z0 = filled_memory(dk, dv, 1, scale)
    k = torch.randn(S, dk, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(S, 1, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(S, dv, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(T, dk, generator=g, dtype=torch.float64, requires_grad=True)
    M = M0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)

    def features() -> tuple[torch.Tensor, torch.Tensor | None]:
        return (elu1(k) * torch.sigmoid(b), elu1(k)) if gated else (elu1(k), None)

    eta = float(delta_step(features()[0].detach(), z.detach()))
    assert eta == 1.0 if scale in (0.0, 10.0) else eta < 0.1

    def run(write, read):  # type: ignore[no-untyped-def]
        sk, rk = features()
        M1, z1 = write(sk, v, M, z, True, True, rk)
        out = read(elu1(q), M1, z1)
        loss = out.pow(2).sum() + M1.sin().sum() + z1.cos().sum()
        grads = torch.autograd.grad(loss, (k, b, v, q, M, z), allow_unused=True)
        return (M1.detach(), z1.detach(), out.detach()), grads

    fast = run(memory_write, memory_read_reference)
    ref = run(memory_write_reference, memory_read_reference)
    for x, y in zip(fast[0] + fast[1], ref[0] + ref[1], strict=True):
        torch.testing.assert_close(x, y)
    # the same retrieval either way; the plain delta rule differs exactly when the bound acts
    sk, rk = features()
    torch.testing.assert_close(memory_write(sk, v, M, z, True, True, rk),
                               memory_write(sk, v, M, z, True, True))
    plain, bounded = memory_write(sk, v, M, z, True)[0], memory_write(sk, v, M, z, True, True)[0]
    assert torch.equal(plain, bounded) == (eta == 1.0)


def test_bound_leaves_the_plain_delta_rule_bit_for_bit_while_g_is_small() -> None:
    g = torch.Generator().manual_seed(0)
    M, z = filled_memory(8, 8, 2, 10.0)
    sk, v = elu1(torch.randn(2, 8, generator=g)), torch.randn(2, 8, generator=g)
    M, z = M.float(), z.float()
    assert float(delta_step(sk, z)) == 1.0
    for a, b in zip(memory_write(sk, v, M, z, True, True), memory_write(sk, v, M, z, True),
                    strict=True):
        assert torch.equal(a, b)


def spectral(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, ord=2))


@pytest.mark.parametrize("bound", [False, True], ids=["plain", "bounded"])
def test_bounded_writes_never_expand_the_memory(bound: bool) -> None:
    """2,000 segment writes whose write strength varies by 12 orders of magnitude between
    segments (a gate writing filler weakly): a strongly written segment after weak ones has
    ‖G‖ >> 2, and the plain delta rule multiplies the memory. The bounded one satisfies
    ‖M_n‖ <= Σ_m ‖σ(K_m)ᵀ V_m‖ (each I − ηG has eigenvalues in [0, 1]) after every write."""
    dk = S = 8
    g = torch.Generator().manual_seed(0)
    M = torch.zeros(dk, dk, dtype=torch.float64)
    z = torch.zeros(dk, dtype=torch.float64)
    budget, worst, biggest = 0.0, 0.0, 0.0
    for _ in range(2000):
        strength = 10.0 ** (-12.0 * torch.rand((), generator=g, dtype=torch.float64))
        sk = elu1(torch.randn(S, dk, generator=g, dtype=torch.float64)) * strength
        v = torch.randn(S, dk, generator=g, dtype=torch.float64)
        if z.sum() > 0:
            c = sk @ z
            biggest = max(biggest, float(torch.linalg.eigvalsh((sk.T / c) @ sk)[-1]))
        M, z = memory_write(sk, v, M, z, True, bound)
        budget += spectral(sk.T @ v)
        worst = max(worst, spectral(M) / budget)
    assert torch.isfinite(M).all() and biggest > 100.0
    if bound:
        assert worst <= 1.0 + 1e-9
    else:
        assert worst > 2.0


def test_the_option_needs_the_delta_rule_and_keeps_old_fingerprints() -> None:
    with pytest.raises(ValueError, match="use_delta_rule=true"):
        ModelConfig.from_name("tiny-infini", use_delta_rule=False, memory_stable_delta=True)
    plain = ModelConfig.from_name("tiny-infini")
    assert "memory_stable_delta" not in plain.fingerprint_json()
    assert "memory_stable_delta" in plain.replace(memory_stable_delta=True).fingerprint_json()


@pytest.mark.parametrize("layer", ["infini", "multi_memory", "hierarchical"])
def test_every_memory_layer_writes_with_the_bound(layer: str) -> None:
    """Same weights with and without the option: the first write (empty memory) is the same,
    the later ones differ where ‖G‖_F > 1, and nothing else changes."""
    ids = torch.randint(1, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    kw = {"layers": (layer, "pythia"), "init_std": 0.1, "memory_write_gate": True,
          "num_memories": 2}  # multi_memory: the third segment goes into a written memory
    plain = make_tiny_model("tiny-infini", **kw)
    bounded = make_tiny_model("tiny-infini", memory_stable_delta=True, **kw)
    with torch.no_grad():
        # a weak first write: ‖G‖_F of the second segment's write well above 1
        for m in (plain, bounded):
            m.layers[0].attention.write_gate_bias.fill_(-8.0)
        a, sa = plain(ids[:, :32])
        b, sb = bounded(ids[:, :32])
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # writes 1 and 2 read later
        a, sa = plain(ids[:, 32:], sa)
        b, sb = bounded(ids[:, 32:], sb)
    assert (a - b).abs().max() > 1e-4
    for name, t in sb.flat_tensors().items():
        assert torch.isfinite(t).all(), name


def test_memory_file_of_a_bounded_model_continues_identically() -> None:
    model = make_tiny_model("tiny-infini", init_std=0.1, **BOUNDED)
    ids = torch.randint(1, 500, (1, 53), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = model(ids[:, :40])
        data = save_memory(state, model)
        fresh = make_tiny_model("tiny-infini", init_std=0.1, **BOUNDED)
        loaded = load_memory(data, fresh)
        a, sa = model(ids[:, 40:], state)
        b, sb = fresh(ids[:, 40:], loaded)  # crosses the write at 48
    assert torch.equal(a, b)
    for (na, ta), (nb, tb) in zip(sa.flat_tensors().items(), sb.flat_tensors().items(),
                                  strict=True):
        assert na == nb and torch.equal(ta, tb), na
    other = make_tiny_model("tiny-infini", init_std=0.1,
                            **{**BOUNDED, "memory_stable_delta": False})
    with pytest.raises(ModelMismatchError):
        load_memory(data, other)



@pytest.mark.parametrize("options", [{"memory_stable_delta": True},
                                     {"memory_write_floor": 1e-3}], ids=["stable", "floor"])
def test_gradients_stay_finite_when_the_write_gate_saturates(options: dict[str, Any]) -> None:
    """A trained write gate drives β of filler tokens to ~1e-38 (measured on the recall toy).
    With ``memory_stable_delta`` the bound's gradient is computed in float64, where
    1 / sqrt(σ(k)·z) cannot overflow; with ``memory_write_floor`` (plain delta rule) σ(k)·z
    never comes near float32's denormals."""
    model = make_tiny_model("tiny-infini", memory_write_gate=True, memory_heads=4,
                            **options).train()
    with torch.no_grad():
        gate = model.layers[0].attention.write_gate
        gate.copy_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)) * 40.0)
    ids = torch.randint(1, 500, (4, 16 * 8), generator=torch.Generator().manual_seed(0))
    logits, _ = model(ids)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_a_saturated_gate_gives_the_plain_rule_nan_gradients_and_the_stable_one_none() -> None:
    """β = sigmoid(-86) ≈ 4e-38 on tokens with small features: β σ(k)·z is a float32 denormal,
    and the backward of the plain rule's retrieval, num / den, overflows (NaN). The stable rule
    retrieves with σ(k): the same value, den = σ(k)·z well inside float32's range."""
    finite = []
    for stable in (False, True):
        g = torch.Generator().manual_seed(0)
        S, dk = 8, 6
        k = torch.randn(S, dk, generator=g)
        k[::2] -= 6.0  # small features on the weakly written tokens
        k.requires_grad_(True)
        logit = torch.zeros(S, 1)
        logit[::2] = -86.0
        logit.requires_grad_(True)
        v = torch.randn(S, dk, generator=g)
        past = elu1(torch.randn(4, dk, generator=g))  # 4 tokens written before, β = 1
        M0, z0 = past.T @ torch.randn(4, dk, generator=g), past.sum(0)
        sk = elu1(k) * torch.sigmoid(logit)
        M, z = memory_write(sk, v, M0, z0, True, stable, elu1(k) if stable else None)
        (M.sin().sum() + z.cos().sum()).backward()
        finite.append(bool(torch.isfinite(k.grad).all() and torch.isfinite(logit.grad).all()))
    assert finite == [False, True]


def test_the_write_floor_is_off_by_default_and_keeps_old_fingerprints() -> None:
    with pytest.raises(ValueError, match="memory_write_gate=true"):
        ModelConfig.from_name("tiny-infini", memory_write_floor=0.01)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ModelConfig.from_name("tiny-infini", memory_write_gate=True, memory_write_floor=1.0)
    gated = ModelConfig.from_name("tiny-infini", memory_write_gate=True)
    assert "memory_write_floor" not in gated.fingerprint_json()
    assert "memory_write_floor" in gated.replace(memory_write_floor=0.01).fingerprint_json()


@pytest.mark.parametrize("layer", ["infini", "multi_memory", "hierarchical"])
def test_the_write_floor_bounds_a_saturated_gate_in_every_memory_layer(layer: str) -> None:
    """A gate driven to β ≈ 0 (bias -100): with the floor ε every token is written with
    β >= ε, so the memory's normaliser grows by at least ε Σ σ(k) a segment; the model is the
    plain gated one bit for bit when ε = 0, and differs from it when ε > 0."""
    kw = {"layers": (layer, "pythia"), "init_std": 0.1, "memory_write_gate": True,
          "num_memories": 2}
    ids = torch.randint(1, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    plain = make_tiny_model("tiny-infini", **kw)
    zero = make_tiny_model("tiny-infini", memory_write_floor=0.0, **kw)
    floored = make_tiny_model("tiny-infini", memory_write_floor=1e-3, **kw)
    for m in (plain, zero, floored):
        with torch.no_grad():
            m.layers[0].attention.write_gate_bias.fill_(-100.0)
    with torch.no_grad():
        a, sa = plain(ids)
        b, _ = zero(ids)
        c, sc = floored(ids)
        attn = floored.layers[0].attention
        mk = torch.randn(2, attn.memory_heads, 16, attn.dk)
        beta = attn.write_strength(mk, torch.randn_like(mk))
    assert torch.equal(a, b)
    assert beta.min() >= 1e-3 and plain.layers[0].attention.write_strength(mk, mk).max() < 1e-30
    assert (a - c).abs().max() > 1e-6
    z_plain = max(float(t.abs().max()) for n, t in sa.flat_tensors().items()
                  if n.startswith("layers.0.") and n.endswith("z"))
    z_floor = max(float(t.abs().max()) for n, t in sc.flat_tensors().items()
                  if n.startswith("layers.0.") and n.endswith("z"))
    assert z_plain < 1e-30 < 1e-3 < z_floor
