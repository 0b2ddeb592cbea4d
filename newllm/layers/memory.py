"""Compressive memory: the functional read/write ops, their slow references, and the segment
machinery shared by the memory mixers (`infini`, `multi_memory`, `hierarchical`).

A memory is a matrix M (dk x dv) and a normaliser z (dk) per memory head, fed with features
σ(x) = ELU(x) + 1 of keys and queries that carry no position encoding:

- read:   A = σ(Q) M / (σ(Q) z)          (an empty memory, z = 0, reads exactly zero)
- linear: M += σ(K)ᵀ V,                  z += Σ_t σ(K_t)
- delta:  M += σ(K)ᵀ (V − σ(K) M / (σ(K) z)),  z as linear (retrieval is zero while z = 0)
- with ``memory_write_gate``, each token's σ(k) is scaled by a learned β ∈ (0, 1) in both
  updates (the read is unchanged by such a scaling, so the delta rule's retrieval is too);
  ``memory_write_floor`` ε makes it β = ε + (1 − ε) sigmoid(·) ∈ (ε, 1)
- with ``memory_stable_delta``, the delta rule with a bounded step η ∈ (0, 1] and its
  retrieval from the ungated σ(K):  M += β σ(K)ᵀ (V − η σ(K) M / (σ(K) z))

Why the stable rule: a delta write is linear in M, M' = (I − G) M + sᵀ V with s = β σ(K) and
G = Σ_t s_tᵀ s_t / (s_t·z), positive semi-definite with nothing keeping its eigenvalues below 2
(training on the recall toy pushed the spectral radius of I − G past 100); η = 1 / max(1, ‖G‖_F)
keeps those of I − ηG in [0, 1], so ‖M‖ grows by at most ‖sᵀ V‖ a write (η = 1, the plain rule,
while ‖G‖_F <= 1). And a saturated write gate (β ~ 1e-38) puts s·z in float32's denormal range,
where the backward of the retrieval's division gives NaN; the retrieval is unchanged when a
token's features are scaled, so σ(K) gives the same value with a sound denominator. The
measurements: training/README.md, "Memory writes over long gaps".

Text is processed in segments of S tokens. Inside a segment, causal softmax attention over the
segment's tokens (rotary at segment-local positions); across segments, the memory read with the
state *before* this segment's write, mixed per head by a learned gate g = sigmoid(β):
``A = g·A_mem + (1 − g)·A_local``. While a memory is empty the gate is forced to 0, so a model
whose memory is reset is exactly a segment-local model. The write happens when a segment is
complete; until then the open segment's (unrotated) keys and values are part of the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.config import ModelConfig
from newllm.layers.common import (
    Rotary,
    SlotStep,
    Step,
    causal_attention,
    length_mask,
    merge_heads,
    slot_attention,
    split_qkv,
)


def elu1(x: Tensor) -> Tensor:
    """σ(x) = ELU(x) + 1: positive features for the linear-attention memory."""
    return F.elu(x) + 1.0


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with den (..., 1) broadcast; rows whose den is 0 give 0 (empty memory)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def memory_read(sq: Tensor, M: Tensor, z: Tensor) -> Tensor:
    """sq (..., T, dk) features, M (..., dk, dv), z (..., dk) -> (..., T, dv)."""
    lead = sq.shape[:-2]
    if (torch.compiler.is_compiling() and sq.shape[-2] == 1 and M.shape[:-2] == lead
            and all(d == 1 for d in lead)):
        # one row of one memory (a compiled one-session decode step): a plain matrix
        # product. Inductor lowers a one-row batched product on the CPU to a loop that
        # recomputes σ(q) for every tile of M (a third of the bundled model's compiled
        # step); an mm reads σ(q) from a buffer computed once.
        q = sq.reshape(1, sq.shape[-1])  # (1, dk)
        num = (q @ M.reshape(M.shape[-2], M.shape[-1])).view(sq.shape[:-1] + M.shape[-1:])
        return _safe_div(num, (q @ z.reshape(-1, 1)).view(sq.shape[:-1] + (1,)))
    return _safe_div(sq @ M, (sq @ z.unsqueeze(-1)))


def delta_step(sk: Tensor, z: Tensor) -> Tensor:
    """η = 1 / max(1, ‖G‖_F) (..., 1, 1) for G = Σ_t sk_tᵀ sk_t / (sk_t·z) (stable delta).

    ‖G‖_F² = Σ_ij (sk_i·sk_j)² / (c_i c_j) with c = sk z: from the segment's (S, S) Gram
    matrix, never forming G. Tokens with c = 0 (an empty memory) retrieve nothing and add 0.
    In float64: a write gate drives β, and so c, to ~1e-38 for filler tokens, where the float32
    backward of 1 / sqrt(c) overflows (G itself stays small: its terms scale like β)."""
    dtype, sk, z = sk.dtype, sk.double(), z.double()
    c = sk @ z.unsqueeze(-1)  # (..., S, 1)
    ok = c > 0
    r = torch.where(ok, torch.rsqrt(torch.where(ok, c, torch.ones_like(c))), torch.zeros_like(c))
    s = sk * r  # rows sk_t / sqrt(c_t)
    gram = s @ s.transpose(-1, -2)  # (..., S, S)
    fro2 = gram.pow(2).sum(dim=(-1, -2), keepdim=True)
    return fro2.clamp_min(1.0).rsqrt().to(dtype)  # no gradient while ‖G‖_F <= 1


def memory_write(sk: Tensor, v: Tensor, M: Tensor, z: Tensor, delta: bool,
                 bound: bool = False, rk: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Write one segment: sk (..., S, dk) features, v (..., S, dv) -> new (M, z).

    ``delta``: the delta rule (else linear); ``bound``: its correction times `delta_step`;
    ``rk`` (..., S, dk): the features it retrieves with, if not ``sk`` (each row a positive
    multiple of sk's: the same retrieval, computed with a better-scaled denominator)."""
    if delta:
        retrieved = memory_read(sk if rk is None else rk, M, z)
        v = v - (delta_step(sk, z) * retrieved if bound else retrieved)
    return M + sk.transpose(-1, -2) @ v, z + sk.sum(dim=-2)


def memory_read_reference(sq: Tensor, M: Tensor, z: Tensor) -> Tensor:
    """Slow, obviously right read: one query at a time, sums written out. sq (T, dk)."""
    out = []
    for t in range(sq.shape[0]):
        den = sum(sq[t, i] * z[i] for i in range(sq.shape[1]))
        num = sum(sq[t, i] * M[i] for i in range(sq.shape[1]))
        out.append(num / den if den > 0 else torch.zeros_like(num))
    return torch.stack(out)


def memory_write_reference(sk: Tensor, v: Tensor, M: Tensor, z: Tensor, delta: bool,
                           bound: bool = False, rk: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Slow write: token by token outer products, retrieval from the memory before the write;
    with ``bound``, the operator G = Σ_t sk_tᵀ sk_t / (sk_t·z) formed and its norm taken."""
    rk = sk if rk is None else rk
    M_new, z_new = M.clone(), z.clone()
    eta = torch.ones((), dtype=sk.dtype)
    if delta and bound:
        G = torch.zeros(sk.shape[1], sk.shape[1], dtype=sk.dtype)
        for t in range(sk.shape[0]):
            den = (sk[t] * z).sum()
            if den > 0:
                G = G + torch.outer(sk[t], sk[t]) / den
        eta = 1.0 / torch.clamp(torch.linalg.matrix_norm(G), min=1.0)
    for t in range(sk.shape[0]):
        target = v[t]
        if delta:
            den = (rk[t] * z).sum()
            target = target - (eta * (rk[t] @ M) / den if den > 0 else torch.zeros_like(target))
        M_new = M_new + torch.outer(sk[t], target)
        z_new = z_new + sk[t]
    return M_new, z_new


@dataclass
class MemorySlots:
    """A memory layer's state for a slot batch (`newllm.slots`): every tensor (slots, ...).

    The open segment sits in fixed buffers of S entries; how many are valid follows from the
    slot's position (``position % S``). ``rot_k`` holds the same keys rotated at their
    segment-local positions, so local attention does not rotate the segment again every step.
    """

    fields: dict[str, Tensor]  # the memory's own tensors (float32), by state field name
    open_k: Tensor  # (slots, H, S, D) unrotated keys of the open segment
    open_v: Tensor  # (slots, H, S, D)
    rot_k: Tensor  # (slots, H, S, D)


class SegmentMemoryAttention(nn.Module):
    """Segment-local causal attention + a compressive memory, gated per head.

    The memory tensors are kept and updated in float32 whatever the model's dtype (bf16 would
    saturate normalisers and counts after a few thousand tokens, fp16 overflow after ~65k).
    Subclasses define the memory: ``memory_shapes(B)``,
    ``read(sq, state) -> (A_mem (B, MH, T, dv), active (B,))`` and
    ``write(sk, v, state, segment) -> {field: tensor}``. The state dataclass must have the
    fields ``open_k`` and ``open_v`` (B, H, o, D) besides the memory's own.
    """

    state_class: type

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        C = config.layer_hidden
        self.config = config
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.segment_len = config.segment_len
        self.memory_heads = config.memory_heads
        self.dk = C // config.memory_heads
        self.delta = config.use_delta_rule
        self.stable_delta = config.memory_stable_delta
        self.query_key_value = nn.Linear(C, 3 * C)
        self.dense = nn.Linear(C, C)
        self.rotary = Rotary(config)
        self.gate = nn.Parameter(torch.full((config.num_heads,), float(config.gate_init)))
        if config.memory_key_shift:  # weight of the previous token's key in a memory key
            self.key_shift = nn.Parameter(torch.ones(config.num_heads, 1, config.head_dim))
        if config.memory_history:  # weights of the previous tokens' keys, for keys and queries
            w = config.memory_history
            start = torch.zeros(config.num_heads, w, config.head_dim)
            start[:, 0] = 1.0  # keys begin as the one-token shift
            self.key_history = nn.Parameter(start)
            self.query_history = nn.Parameter(torch.zeros(config.num_heads, w, config.head_dim))
        if config.memory_write_gate:  # write strength from a token's memory key and value
            self.write_gate = nn.Parameter(torch.zeros(config.memory_heads, 2 * self.dk, 1))
            self.write_gate_bias = nn.Parameter(torch.zeros(config.memory_heads, 1, 1))

    # subclass API ------------------------------------------------------------------------
    def memory_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, sq: Tensor, q: Tensor, state: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def write(self, sk: Tensor, k: Tensor, v: Tensor, state: Any,
              segment: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def write_group(self, segment: int) -> Any:
        """Segments whose writes `write` handles alike (one call for all rows of a group)."""
        return None

    # shared machinery ----------------------------------------------------------------------
    def write_memory(self, sk: Tensor, k: Tensor, v: Tensor, M: Tensor,
                     z: Tensor) -> tuple[Tensor, Tensor]:
        """`memory_write` with this layer's rule: sk = `write_features` of the memory keys k."""
        if self.stable_delta:
            return memory_write(sk, v, M, z, True, bound=True, rk=elu1(k))
        return memory_write(sk, v, M, z, self.delta)

    def memory_state(self, batch_size: int, device: Any) -> dict[str, Tensor]:
        """The empty memory: zeros, float32."""
        return {k: torch.zeros(s, device=device, dtype=torch.float32)
                for k, s in self.memory_shapes(batch_size).items()}

    def state_dtypes(self, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
        """Field -> dtype: memory fields float32, the open segment in the model's dtype."""
        fields = dict.fromkeys(self.memory_shapes(1), torch.float32)
        return {**fields, "open_k": model_dtype, "open_v": model_dtype}

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> Any:
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device,
                            dtype=dtype)
        return self.state_class(open_k=empty, open_v=empty.clone(),
                                **self.memory_state(batch_size, device))

    def state_shapes(self, batch_size: int, position: int) -> dict[str, tuple[int, ...]]:
        o = position % self.segment_len
        open_shape = (batch_size, self.num_heads, o, self.head_dim)
        return {**self.memory_shapes(batch_size), "open_k": open_shape, "open_v": open_shape}

    def to_memory_heads(self, x: Tensor) -> Tensor:
        """(B, H, T, D) -> (B, MH, T, C/MH): the memory sees the full width, split MH ways."""
        B, _, T, _ = x.shape
        return merge_heads(x).view(B, T, self.memory_heads, self.dk).transpose(1, 2)

    def from_memory_heads(self, x: Tensor) -> Tensor:
        """(B, MH, T, dv) -> (B, H, T, D)."""
        B, _, T, _ = x.shape
        return x.transpose(1, 2).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def memory_keys(self, seg_k: Tensor) -> Tensor:
        """The keys a complete segment writes (B, H, S, D): its own keys, plus (with
        ``memory_key_shift``) each previous token's key times a learned weight, or (with
        ``memory_history`` w) the keys of the w previous tokens, each times its own weight
        (without its own key when ``memory_key_self`` is false). The segment's first tokens have
        fewer predecessors here (history does not cross segment boundaries)."""
        if self.config.memory_key_shift:
            prev = F.pad(seg_k, (0, 0, 1, 0))[:, :, :-1]  # (B, H, S, D): key of token t - 1
            return seg_k + self.key_shift.to(seg_k.dtype) * prev
        if self.config.memory_history:
            hist = self.history(seg_k, self.key_history, 0)
            return seg_k + hist if self.config.memory_key_self else hist
        return seg_k

    def memory_queries(self, qs: Tensor, seg_k: Tensor, o: int) -> Tensor:
        """Queries (B, H, n, D) of the segment's tokens o .. o+n-1 as the memory reads them:
        with ``memory_history``, plus the keys of each one's previous tokens in the segment."""
        if not self.config.memory_history:
            return qs
        return qs + self.history(seg_k, self.query_history, o)

    def history(self, seg_k: Tensor, weights: Tensor, o: int) -> Tensor:
        """Σ_j weights[:, j] * key of token t - 1 - j, for t = o .. end of seg_k (B, H, ., D)."""
        L = seg_k.shape[-2]
        out = torch.zeros_like(seg_k[:, :, o:])
        for j in range(min(weights.shape[1], L - 1)):  # lags beyond the segment add nothing
            lag = j + 1
            prev = F.pad(seg_k, (0, 0, lag, 0))[:, :, o:L]  # key of token t - lag (0 before 0)
            out = out + weights[:, j:j + 1].to(seg_k.dtype) * prev
        return out

    def write_strength(self, mk: Tensor, mv: Tensor) -> Tensor:
        """β (B, MH, S, 1) in (0, 1): how strongly each token of a complete segment is written
        (``memory_write_gate``), from its memory key and value (float32, memory heads); in
        (ε, 1) with ``memory_write_floor`` ε > 0."""
        kv = torch.cat((mk, mv), dim=-1)  # (B, MH, S, 2 dk)
        w, b = self.write_gate.float(), self.write_gate_bias.float()
        beta = torch.sigmoid(kv @ w + b)
        floor = self.config.memory_write_floor
        return floor + (1.0 - floor) * beta if floor else beta

    def write_features(self, mk: Tensor, mv: Tensor) -> Tensor:
        """The key features a complete segment writes: σ(K), times β with the write gate.

        A read σ(q) M / σ(q) z does not change when one token's features are scaled, so the
        delta rule's retrieval inside `memory_write` is the same for β·σ(K) as for σ(K), and
        passing β·σ(K) writes M += Σ β σ(k)ᵀ (v − retrieved), z += Σ β σ(k): the gated rule.
        """
        sk = elu1(mk)
        if self.config.memory_write_gate:
            sk = sk * self.write_strength(mk, mv)
        return sk

    def forward(self, x: Tensor, state: Any, step: Step) -> tuple[Tensor, Any]:
        S = self.segment_len
        q, k, v = split_qkv(self.query_key_value(x), self.num_heads)  # (B, H, T, D) each
        T = x.shape[1]
        outs = []
        pos, start = step.position, 0
        while start < T:
            o = pos % S  # tokens already in the open segment
            n = min(S - o, T - start)
            qs, ks, vs = (t[:, :, start:start + n] for t in (q, k, v))
            seg_k = torch.cat((state.open_k, ks), dim=-2)  # (B, H, o+n, D) unrotated
            seg_v = torch.cat((state.open_v, vs), dim=-2)
            local = causal_attention(self.rotary(qs, o), self.rotary(seg_k, 0), seg_v)
            qm = self.to_memory_heads(self.memory_queries(qs, seg_k, o)).float()  # in float32
            a_mem, active = self.read(elu1(qm), qs.float(), state)
            a_mem = a_mem.to(x.dtype)
            g = torch.sigmoid(self.gate).view(1, -1, 1, 1) * active.view(-1, 1, 1, 1).to(x.dtype)
            outs.append(g * self.from_memory_heads(a_mem) + (1 - g) * local)  # (B, H, n, D)
            if o + n == S:  # the segment is complete: write it, open a new one
                mk = self.to_memory_heads(self.memory_keys(seg_k)).float()
                mv = self.to_memory_heads(seg_v).float()
                fields = self.write(self.write_features(mk, mv), mk, mv, state, pos // S)
                empty = seg_k[:, :, :0]
                state = dataclasses.replace(state, open_k=empty, open_v=empty, **fields)
            else:
                state = dataclasses.replace(state, open_k=seg_k, open_v=seg_v)
            pos += n
            start += n
        if not outs:  # no new tokens
            return torch.zeros_like(x), state
        out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
        return self.dense(merge_heads(out)), state

    # slots (see newllm.slots) ---------------------------------------------------------------
    def slot_init(self, slots: int, device: Any, dtype: torch.dtype) -> MemorySlots:
        z = torch.zeros(slots, self.num_heads, self.segment_len, self.head_dim, device=device,
                        dtype=dtype)
        return MemorySlots(self.memory_state(slots, device), z, z.clone(), z.clone())

    def slot_load(self, buf: MemorySlots, row: int, state: Any, position: int) -> None:
        for name, t in buf.fields.items():
            t[row] = getattr(state, name)[0]
        o = state.open_k.shape[-2]
        for t in (buf.open_k, buf.open_v, buf.rot_k):
            t[row].zero_()
        buf.open_k[row, :, :o] = state.open_k[0]
        buf.open_v[row, :, :o] = state.open_v[0]
        buf.rot_k[row, :, :o] = self.rotary(state.open_k[0], 0)

    def slot_extract(self, buf: MemorySlots, row: int, position: int) -> Any:
        o = position % self.segment_len
        return self.state_class(
            **{name: t[row:row + 1].clone() for name, t in buf.fields.items()},
            open_k=buf.open_k[row:row + 1, :, :o].clone(),
            open_v=buf.open_v[row:row + 1, :, :o].clone())

    def _rows_state(self, buf: MemorySlots, take: Any) -> Any:
        """A state object over some rows' memory tensors, for `read` and `write`."""
        return self.state_class(**{name: take(t) for name, t in buf.fields.items()},
                                open_k=None, open_v=None)

    def slot_step(self, x: Tensor, buf: MemorySlots, step: SlotStep) -> Tensor:
        """One token per row: x (N, 1, C) -> (N, 1, C). Reads the memory as it was before this
        token; the rows whose token completes a segment then write it into their memory."""
        S, N = self.segment_len, x.shape[0]
        q, k, v = split_qkv(self.query_key_value(x), self.num_heads)  # (N, H, 1, D) each
        o = step.position % S  # (N,) the token's place in its segment
        rows = step.rows
        buf.open_k[rows, :, o] = k[:, :, 0]
        buf.open_v[rows, :, o] = v[:, :, 0]
        buf.rot_k[rows, :, o] = step.rotate(self.rotary, k, S)[:, :, 0]
        width = S if step.fixed else max(p % S for p in step.host_position) + 1
        local = slot_attention(step.rotate(self.rotary, q, S), step.take(buf.rot_k)[:, :, :width],
                               step.take(buf.open_v)[:, :, :width], length_mask(o + 1, width),
                               step.fixed)
        qm = q
        if self.config.memory_history:  # + the keys of the previous tokens of the segment
            w, hist = self.query_history, torch.zeros_like(q)
            for j in range(w.shape[1]):
                at = o - (j + 1)
                prev = buf.open_k[rows, :, at.clamp_min(0)].unsqueeze(2)  # (N, H, 1, D)
                prev = torch.where((at >= 0).view(N, 1, 1, 1), prev, torch.zeros_like(prev))
                hist = hist + w[:, j:j + 1].to(q.dtype) * prev
            qm = q + hist
        qm = self.to_memory_heads(qm).float()
        a_mem, active = self.read(elu1(qm), q.float(), self._rows_state(buf, step.take))
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1) * active.view(-1, 1, 1, 1).to(x.dtype)
        out = g * self.from_memory_heads(a_mem.to(x.dtype)) + (1 - g) * local  # (N, H, 1, D)
        if not step.fixed:  # a fixed step leaves the writes to slot_finish
            self.slot_finish(buf, step)
        return self.dense(merge_heads(out))

    def slot_finish(self, buf: MemorySlots, step: SlotStep) -> None:
        """The rows whose token completes a segment write it into their memories."""
        ends = step.ending(self.segment_len)
        if ends:
            self._slot_write(buf, step, ends)

    def slot_backup(self, buf: MemorySlots, step: SlotStep) -> Callable[[], None] | None:
        """What undoes this step's memory writes (for a step that fails part-way): the memory
        of the rows that complete a segment, copied. Everything else a step writes lies past
        the rows' valid lengths until their positions advance, which a failed step never does."""
        ends = step.ending(self.segment_len)
        if not ends:
            return None
        rows = step.rows[torch.tensor(ends, device=step.rows.device)]
        saved = {name: t[rows].clone() for name, t in buf.fields.items()}

        def restore() -> None:
            for name, t in saved.items():
                buf.fields[name][rows] = t
        return restore

    def _slot_write(self, buf: MemorySlots, step: SlotStep, ends: list[int]) -> None:
        """Write the complete segments of rows ``ends`` into their slots' memories (one `write`
        call per `write_group`, e.g. per memory bank; one group in most configs)."""
        S = self.segment_len
        groups: dict[Any, list[int]] = {}
        for i in ends:
            groups.setdefault(self.write_group(step.host_position[i] // S), []).append(i)
        for members in groups.values():
            rows = step.rows[torch.tensor(members, device=step.rows.device)]  # (W,)
            seg_k, seg_v = buf.open_k[rows], buf.open_v[rows]  # (W, H, S, D)
            mk = self.to_memory_heads(self.memory_keys(seg_k)).float()
            mv = self.to_memory_heads(seg_v).float()
            segment = step.host_position[members[0]] // S
            fields = self.write(self.write_features(mk, mv), mk, mv,
                                self._rows_state(buf, lambda t, r=rows: t[r]), segment)
            for name, t in fields.items():
                buf.fields[name][rows] = t
