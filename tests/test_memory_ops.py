"""Memory read/write fast paths against their slow references (outputs, state, gradients), the
delta rule's idempotence, the empty-memory guarantee, banks, routing and the coarse memory."""

from __future__ import annotations

import pytest
import torch

from newllm import ModelConfig, TransformerLM
from newllm.layers.memory import (
    elu1,
    memory_read,
    memory_read_reference,
    memory_write,
    memory_write_reference,
)
from newllm.layers.multi_memory import route


def random_memory(dk: int, dv: int, seed: int, writes: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sk = elu1(torch.randn(writes, dk, generator=g, dtype=torch.float64))
    v = torch.randn(writes, dv, generator=g, dtype=torch.float64)
    return sk.T @ v, sk.sum(0)


@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
@pytest.mark.parametrize("empty", [True, False], ids=["empty", "filled"])
def test_write_and_read_match_reference_with_gradients(delta: bool, empty: bool) -> None:
    dk, dv, S, T = 6, 5, 7, 4
    g = torch.Generator().manual_seed(3)
    M0, z0 = random_memory(dk, dv, 1)
    if empty:
        M0, z0 = torch.zeros_like(M0), torch.zeros_like(z0)
    k = torch.randn(S, dk, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(S, dv, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(T, dk, generator=g, dtype=torch.float64, requires_grad=True)
    M = M0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)

    def run(write, read):  # type: ignore[no-untyped-def]
        M1, z1 = write(elu1(k), v, M, z, delta)
        out = read(elu1(q), M1, z1)
        loss = out.pow(2).sum() + M1.sin().sum() + z1.cos().sum()
        grads = torch.autograd.grad(loss, (k, v, q, M, z))
        return M1.detach(), z1.detach(), out.detach(), grads

    fast = run(memory_write, memory_read)
    ref = run(memory_write_reference, memory_read_reference)
    for a, b in zip(fast[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(fast[3], ref[3], strict=True):
        torch.testing.assert_close(a, b)


def test_empty_memory_reads_zero_and_first_delta_write_is_linear() -> None:
    sq = elu1(torch.randn(3, 4))
    assert torch.equal(memory_read(sq, torch.zeros(4, 5), torch.zeros(4)), torch.zeros(3, 5))
    sk, v = elu1(torch.randn(6, 4)), torch.randn(6, 5)
    lin = memory_write(sk, v, torch.zeros(4, 5), torch.zeros(4), delta=False)
    dlt = memory_write(sk, v, torch.zeros(4, 5), torch.zeros(4), delta=True)
    torch.testing.assert_close(lin, dlt)


def test_delta_rule_is_idempotent() -> None:
    """Writing what the memory already returns for those keys leaves M unchanged."""
    g = torch.Generator().manual_seed(0)
    M, z = random_memory(8, 8, 2, writes=12)
    sk, v = elu1(torch.randn(5, 8, generator=g, dtype=torch.float64)), torch.randn(
        5, 8, generator=g, dtype=torch.float64)
    M1, z1 = memory_write(sk, v, M, z, delta=True)
    stored = memory_read(sk, M1, z1)
    M2, _ = memory_write(sk, stored, M1, z1, delta=True)
    torch.testing.assert_close(M2, M1)
    # one token: the memory then returns exactly v, so the same write again changes nothing
    one_k, one_v = sk[:1], v[:1]
    Ma, za = memory_write(one_k, one_v, torch.zeros_like(M), torch.zeros_like(z), delta=True)
    torch.testing.assert_close(memory_read(one_k, Ma, za), one_v)
    Mb, _ = memory_write(one_k, one_v, Ma, za, delta=True)
    torch.testing.assert_close(Mb, Ma)
    # the linear rule is not idempotent: it adds the segment again
    Mc, _ = memory_write(one_k, one_v, Ma, za, delta=False)
    assert not torch.allclose(Mc, Ma)


def memory_model(layer: str, **overrides: object) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-pythia", layers=(layer,), **overrides)
    return TransformerLM(cfg).eval()


@pytest.mark.parametrize("layer", ["infini", "multi_memory", "hierarchical"])
def test_empty_memory_gives_local_attention_full_weight(layer: str) -> None:
    """Within the first segment the output cannot depend on the gate: memory is empty."""
    model = memory_model(layer)
    ids = torch.randint(0, 500, (1, 16))
    outs = []
    for gate in (-30.0, 0.0, 30.0):
        with torch.no_grad():
            model.layers[0].attention.gate.fill_(gate)
            outs.append(model(ids)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    with torch.no_grad():  # ...while in the second segment it does
        ids2 = torch.randint(0, 500, (1, 32))
        model.layers[0].attention.gate.fill_(-30.0)
        a = model(ids2)[0][:, 16:]
        model.layers[0].attention.gate.fill_(30.0)
        b = model(ids2)[0][:, 16:]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("delta", [False, True])
def test_memory_reset_model_is_segment_local(delta: bool) -> None:
    """Feeding segments each from a fresh state == a model that never had a memory."""
    model = memory_model("infini", use_delta_rule=delta)
    ids = torch.randint(0, 500, (1, 48))
    with torch.no_grad():
        model.layers[0].attention.gate.fill_(-1e4)  # memory weight exactly 0 in fp32
        carried = model(ids)[0]
        reset = torch.cat([model(ids[:, i:i + 16])[0] for i in (0, 16, 32)], dim=1)
    torch.testing.assert_close(carried, reset)


def test_banks_recycle_the_oldest() -> None:
    """NB=2, one segment per bank: after segments A, B, C, bank 0 holds C only (cleared)."""
    model = memory_model("infini", num_memory_banks=2, segments_per_bank=1)
    ids = torch.randint(0, 500, (1, 48))
    with torch.no_grad():
        _, s_abc = model(ids)
        _, s_c = model(ids[:, 32:])  # C alone from empty: written into bank 0
        _, s_bc = model(ids[:, 16:])  # B -> bank 0, C -> bank 1
    # layer 0's keys/values depend only on each token, so the writes are comparable
    torch.testing.assert_close(s_abc.layers[0].memory[:, 0], s_c.layers[0].memory[:, 0])
    torch.testing.assert_close(s_abc.layers[0].memory[:, 1], s_bc.layers[0].memory[:, 0])


def test_multi_memory_routing() -> None:
    key_sum = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                            [[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]])  # (B=2, N=3, C=2)
    count = torch.tensor([[4.0, 0.0, 0.0], [2.0, 3.0, 1.0]])
    k_mean = torch.tensor([[0.0, 1.0], [0.1, 1.0]])
    # row 0: memory 1 is the first empty one; row 1: all full -> most similar mean key (1)
    assert route(k_mean, key_sum, count).tolist() == [1, 1]
    model = memory_model("multi_memory", num_memories=3)
    with torch.no_grad():
        _, s = model(torch.randint(0, 500, (1, 16 * 5)))
    counts = s.layers[0].count[0].tolist()
    assert counts[:3] != [0, 0, 0] and all(c > 0 for c in counts) and sum(counts) == 80


def test_hierarchical_coarse_memory_is_an_infini_memory() -> None:
    hier = memory_model("hierarchical")
    infini = memory_model("infini")
    infini.load_state_dict(
        {k: v for k, v in hier.state_dict().items() if "expand" not in k}, strict=True)
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        _, sh = hier(ids)
        _, si = infini(ids)
    torch.testing.assert_close(sh.layers[0].coarse, si.layers[0].memory[:, 0])
    torch.testing.assert_close(sh.layers[0].coarse_z, si.layers[0].z[:, 0])


@pytest.mark.parametrize("delta", [False, True], ids=["linear", "delta"])
def test_write_gate_scaling_features_is_the_gated_rule(delta: bool) -> None:
    """`memory_write` fed β·σ(K) gives M += Σ β σ(k)ᵀ (v − retrieved(σ(k))), z += Σ β σ(k):
    the retrieval ignores a per-token scale of the features."""
    dk, dv, S = 6, 5, 7
    g = torch.Generator().manual_seed(4)
    M, z = random_memory(dk, dv, 2)
    sk = elu1(torch.randn(S, dk, generator=g, dtype=torch.float64))
    v = torch.randn(S, dv, generator=g, dtype=torch.float64)
    beta = torch.rand(S, 1, generator=g, dtype=torch.float64)
    fast_M, fast_z = memory_write(beta * sk, v, M, z, delta)
    ref_M, ref_z = M.clone(), z.clone()
    for t in range(S):  # every token sees the memory before the segment, as in the fast path
        target = v[t] - (sk[t] @ M) / (sk[t] @ z) if delta else v[t]
        ref_M = ref_M + beta[t] * torch.outer(sk[t], target)
        ref_z = ref_z + beta[t] * sk[t]
    torch.testing.assert_close(fast_M, ref_M)
    torch.testing.assert_close(fast_z, ref_z)
