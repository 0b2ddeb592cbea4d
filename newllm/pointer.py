"""`PointerCache`: a fixed-size memory whose values are token identities (``pointer_dim`` > 0).

The memory layers carry hidden vectors from segment to segment; what they carry back is read
through the layers above, and in the bundled model that path learned to bring back digits but no
words. The pointer cache carries the tokens themselves. For every token x_t read, it keeps the pair
(u_{t-1}, x_t): the input of the position that predicted the token and the token, in a matrix
of non-negative masses (dk x V) and a normaliser (dk)::

    u_t = h_t                  (the final hidden state, after the final LayerNorm)
        = [h_t ; e_t]          (``pointer_token_keys``: and the token's input embedding)
    write x_t:   mass[:, x_t] += β_t φ(W_k u_{t-1}),   z += β_t φ(W_k u_{t-1}),
                 β_t = sigmoid(w_β · h_{t-1} + b_β)
    read at s:   p_copy = φ(W_q u_s) mass / (φ(W_q u_s) · z)      (a distribution over tokens)
    next token:  p = (1 − λ_s) softmax(logits_s) + λ_s p_copy,  λ_s = sigmoid(w_λ · h_s + b_λ)

with φ(x) = ELU(x) + 1, as in the memory layers, and λ = 0 while the cache is empty. With
``pointer_gate_inputs`` the gate also reads the read itself, each by a learned weight (starting
at 0): "focus", log Σ_v p_copy(v)² (near 0 when the read found one token, near −log V when it is
spread over everything written), and "momentum", p_copy_{s-1}(x_s), the previous read's
probability of the token that came (high inside a copy, so the copy of a name's second token is
mixed in as strongly as its first).

With ``pointer_span`` L > 1 the pointer also reads **spans**: the query that finds where a name
began also brings back the tokens that followed it there. Depth d = 2..L keeps its own masses,
where token x_t is written under the key of u_{t-d} (the pair d - 1 tokens before it), and is read
at s with the query of u_{s-d+1}, the one the first read used d - 1 tokens ago::

    write x_t:  mass_d[:, x_t] += β_{t-d} φ(W_k u_{t-d})
    read at s:  p_d = φ(W_q u_{s-d+1}) mass_d / (φ(W_q u_{s-d+1}) · z_d)
    next token: p = w_0 softmax(logits_s) + Σ_d w_d p_d,  w = softmax(0, g_1, .., g_L)

Each depth has its own gate g_d (w_d · h_s + b_d, and its weights of the gate inputs; its
"momentum" is the read of depth d − 1 at s − 1, which has the same query, at the token x_s that
came: high while the span read so far was right). With L = 1 the weights are (1 − λ, λ) as
above. A name's first token is found by what was said around it ("my name is" against "your
name is"); its later tokens no longer need a key that matches the hidden state at the middle of
a word in two different sentences.

It is a continuous cache (Grave et al., 2017) with learned projections, compressed into a fixed
size: L · dk · V floats per session however long the conversation. A model with a pointer
returns log p as its logits (log-probabilities are logits: softmax gives p back), so sampling,
scoring and training need no change. Every pair is written before the read at its token's
position, so a read at s sees the tokens up to s. The state (`PointerState`, with a span
`PointerSpanState`) is part of the `ModelState` (``pointer.mass``, ``pointer.z``,
``pointer.last``, and ``pointer.span_*``): saved in memory files, moved with sessions, batched
in `newllm.slots`. `pointer_reference` is the plain token-by-token version
the tests hold the chunked one to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from newllm.layers.memory import elu1
from newllm.state import state_tensors

CHUNK = 256  # positions read together in `PointerCache.forward` (a (chunk x chunk) score matrix)
POINTER_GATE_INPUTS = ("focus", "momentum")  # what the mixing gate can read besides h


@dataclass(frozen=True)
class PointerState:
    mass: Tensor  # (B, dk, V) float32: Σ β φ(k) per token written
    z: Tensor  # (B, dk) float32: Σ β φ(k)
    last: Tensor  # (B, W) the keys' input at the last position read (zeros before any token)


@dataclass(frozen=True)
class PointerSpanState(PointerState):
    """A pointer that reads spans (``pointer_span`` = L > 1) or pairs at least W tokens old
    (``pointer_delay`` = W > 0): depth d = 2..L's masses hold the token d - 1 after each pair,
    and what the next positions still need of the last ones (the pairs not yet written). At
    position p, before it is read (tensors of a size 0 where L = 1 or W = 0):"""

    span_mass: Tensor  # (B, L-1, dk, V) float32: depth d's masses at [:, d - 2]
    span_z: Tensor  # (B, L-1, dk) float32
    span_keys: Tensor  # (B, W+L-1, dk) float32: β φ(W_k u) at p-W-L .. p-2 (0 before any)
    span_queries: Tensor  # (B, L-1, dk) float32: φ(W_q u) at p-L+1 .. p-1 (0 before any)
    span_tokens: Tensor  # (B, W) float32: the token ids at p-W .. p-1, not yet written


@dataclass
class PointerSlots:
    """The pointer's state for a slot batch (`newllm.slots`): every tensor (slots, ...)."""

    mass: Tensor
    z: Tensor
    last: Tensor


@dataclass
class PointerSpanSlots(PointerSlots):
    span_mass: Tensor
    span_z: Tensor
    span_keys: Tensor
    span_queries: Tensor
    span_tokens: Tensor


def mix_log(lp: Tensor, gates: list[Tensor], nums: list[Tensor], dens: list[Tensor]) -> Tensor:
    """log(w_0 exp(lp) + Σ_d w_d num_d / den_d), w = softmax(0, g_1, .., g_L) over the reads
    with den_d > 0 (the others get no weight; with one read, w_1 = sigmoid(g_1)), on
    broadcastable tensors: the mixture at every token (num (..., V), gate and den (..., 1)) or
    at the targets alone."""
    off = torch.full_like(gates[0], -torch.inf)
    g = [torch.where(den > 0, gate, off) for gate, den in zip(gates, dens, strict=True)]
    logw = torch.log_softmax(torch.stack([torch.zeros_like(g[0]), *g]), 0)
    out = logw[0] + lp
    for w, num, den in zip(logw[1:], nums, dens, strict=True):
        ok = (num > 0) & (den > 0)
        lp_copy = torch.where(ok, torch.log(torch.where(ok, num, torch.ones_like(num)))
                              - torch.log(torch.where(den > 0, den, torch.ones_like(den))),
                              torch.full_like(num, -torch.inf))
        out = torch.logaddexp(out, w + lp_copy)
    return out


def focus_of(num: Tensor, den: Tensor) -> Tensor:
    """log Σ_v p_copy(v)² from a read's num (..., V) and den (...); 0 where den is 0."""
    return log_ratio((num * num).sum(-1), den * den)


def log_ratio(a: Tensor, b: Tensor) -> Tensor:
    """log(a / b) where b > 0 (then a > 0 too: a read that saw a pair gives it mass), else 0."""
    on = b > 0
    one = torch.ones_like(b)
    return torch.where(on, torch.log(torch.where(on, a, one)) - torch.log(torch.where(on, b, one)),
                       torch.zeros_like(b))


def ratio(a: Tensor, b: Tensor) -> Tensor:
    """a / b where b > 0, else 0."""
    on = b > 0
    return torch.where(on, a / torch.where(on, b, torch.ones_like(b)), torch.zeros_like(b))


class PointerCache(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        d, dk = config.layer_hidden, config.pointer_dim
        self.hidden, self.dk, self.vocab = d, dk, config.vocab_size
        self.token_keys = config.pointer_token_keys
        self.span = config.pointer_span
        self.delay = config.pointer_delay
        self.width = d + config.hidden_size if self.token_keys else d
        self.query = nn.Linear(self.width, dk)
        self.key = nn.Linear(self.width, dk)
        self.write_gate = nn.Linear(d, 1)
        self.mix_gate = nn.Linear(d, 1)
        self.gate_inputs = tuple(config.pointer_gate_inputs)
        # the gate's weight for each of gate_inputs (none without them)
        self.gate_read = (nn.Parameter(torch.zeros(len(self.gate_inputs)))
                          if self.gate_inputs else None)
        # the reads of depth 2..span: their mixing gates, and their weights of the gate inputs
        self.span_gate = nn.Linear(d, self.span - 1) if self.span > 1 else None
        self.span_read = (nn.Parameter(torch.zeros(self.span - 1, len(self.gate_inputs)))
                          if self.span > 1 and self.gate_inputs else None)

    def reset_parameters(self, std: float) -> None:
        """Small projections, zero biases, and a mixing gate that starts nearly closed
        (λ ≈ 0.05), so a pointer added to a trained model starts close to the model alone."""
        for lin in (self.query, self.key, self.write_gate, self.mix_gate):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.mix_gate.bias, -3.0)
        if self.gate_read is not None:
            nn.init.zeros_(self.gate_read)
        if self.span_gate is not None:  # the span's gates nearly closed (each ≈ 0.25%)
            nn.init.normal_(self.span_gate.weight, std=std)
            nn.init.constant_(self.span_gate.bias, -6.0)
        if self.span_read is not None:
            nn.init.zeros_(self.span_read)

    # state ---------------------------------------------------------------------------------
    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        out = {"mass": (batch_size, self.dk, self.vocab), "z": (batch_size, self.dk),
               "last": (batch_size, self.width)}
        if self.extended:
            L1, W = self.span - 1, self.delay
            out.update(span_mass=(batch_size, L1, self.dk, self.vocab),
                       span_z=(batch_size, L1, self.dk),
                       span_keys=(batch_size, W + L1, self.dk),
                       span_queries=(batch_size, L1, self.dk), span_tokens=(batch_size, W))
        return out

    @property
    def extended(self) -> bool:
        """Whether the state is a `PointerSpanState` (a span or a delay)."""
        return self.span > 1 or self.delay > 0

    def state_dtypes(self, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
        return {n: model_dtype if n == "last" else torch.float32 for n in self.state_shapes(1)}

    def state_type(self) -> type:
        return PointerSpanState if self.extended else PointerState

    def init_state(self, batch_size: int, device: Any, dtype: torch.dtype) -> PointerState:
        shapes, dtypes = self.state_shapes(batch_size), self.state_dtypes(dtype)
        return self.state_type()(**{n: torch.zeros(s, device=device, dtype=dtypes[n])
                                    for n, s in shapes.items()})

    # the computation -----------------------------------------------------------------------
    def inputs(self, hidden: Tensor, embedded: Tensor) -> Tensor:
        """The keys' and queries' input u (..., W) from the final hidden states (..., d) and
        the tokens' input embeddings (..., hidden_size)."""
        return torch.cat((hidden, embedded), -1) if self.token_keys else hidden

    def write_features(self, u: Tensor) -> Tensor:
        """β φ(W_k u) (..., dk), float32."""
        return elu1(self.key(u)).float() * torch.sigmoid(self.write_gate(u[..., :self.hidden]))

    def query_features(self, u: Tensor) -> Tensor:
        """φ(W_q u) (..., dk), float32."""
        return elu1(self.query(u)).float()

    def gate(self, hidden: Tensor, focus: Tensor | None, momentum: Tensor | None,
             depth: int = 1) -> Tensor:
        """The mixing gate's logit (...) in float32 of the read of ``depth`` (1: the token
        after the pairs found; d: the token d - 1 after that): w · h + b, plus each gate
        input (`pointer_gate_inputs`; the ones not used may be None) times its weight."""
        if depth == 1:
            g, weights = self.mix_gate(hidden)[..., 0].float(), self.gate_read
        else:
            assert self.span_gate is not None
            g = self.span_gate(hidden)[..., depth - 2].float()
            weights = None if self.span_read is None else self.span_read[depth - 2]
        if weights is not None:
            inputs = {"focus": focus, "momentum": momentum}
            for i, name in enumerate(self.gate_inputs):
                x = inputs[name]
                assert x is not None, f"the gate reads {name}"
                g = g + weights[i].float() * x
        return g

    def uses(self, name: str) -> bool:
        return name in self.gate_inputs

    def _pairs(self, u: Tensor, last: Tensor, c0: int, c1: int, started: Tensor
               ) -> tuple[Tensor, Tensor]:
        """The chunk's pairs: the keys' inputs u_{j-1} (B, n, W) and their write features
        (B, n, dk) (zero for a first token with nothing before it)."""
        B = u.shape[0]
        prev = torch.cat((last[:, None].to(u.dtype), u[:, c0:c1 - 1]), 1)
        fk = self.write_features(prev)  # pair j = (u_{j-1}, ids_j)
        if c0 == 0:
            fk = fk * torch.cat((started.view(B, 1, 1).float(), torch.ones_like(fk[:, 1:, :1])), 1)
        return prev, fk

    def _depths(self, state: PointerState, fk: Tensor, u: Tensor, tok: Tensor
                ) -> tuple[list[Tensor], list[Tensor], Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Each depth's keys and queries for a chunk's n positions s, and the tokens of the
        pairs the chunk adds: depth d reads with the features of u_{s-d+1}, and at s adds the
        token x_{s-W} under the features of u_{s-W-d} (W = ``pointer_delay``, so a read sees
        the pairs at least W tokens old). Returns (keys, queries: lists of (B, n, dk) by depth
        1..span; the pairs' tokens (B, n); the whole key, query and token sequences, whose ends
        the state keeps)."""
        L, n = self.span, fk.shape[1]
        keys, queries, toks = fk, self.query_features(u), tok
        if self.extended:
            assert isinstance(state, PointerSpanState)
            keys = torch.cat((state.span_keys, keys), 1)  # u_{c0-W-L} .. u_{c1-2}
            queries = torch.cat((state.span_queries, queries), 1)  # u_{c0-L+1} .. u_{c1-1}
            toks = torch.cat((state.span_tokens.to(tok.dtype), tok), 1)  # x_{c0-W} .. x_{c1-1}
        return ([keys[:, L - d:L - d + n] for d in range(1, L + 1)],
                [queries[:, L - d:L - d + n] for d in range(1, L + 1)], toks[:, :n],
                (keys, queries, toks))

    def _masses(self, state: PointerState) -> list[tuple[Tensor, Tensor]]:
        """(mass, z) of each depth 1..span."""
        out = [(state.mass, state.z)]
        if isinstance(state, PointerSpanState):
            out += [(state.span_mass[:, i], state.span_z[:, i]) for i in range(self.span - 1)]
        return out

    def write(self, mass: Tensor, z: Tensor, tok: Tensor, fk: Tensor) -> tuple[Tensor, Tensor]:
        """(mass, z) with the pairs (fk (B, n, dk), tok (B, n)) added."""
        B, n = tok.shape
        return (mass.scatter_add(2, tok[:, None, :].expand(B, self.dk, n), fk.transpose(1, 2)),
                z + fk.sum(1))

    def _advance(self, state: PointerState, u_last: Tensor, tok: Tensor, keys: list[Tensor],
                 seqs: tuple[Tensor, Tensor, Tensor]) -> PointerState:
        """The state after a chunk: every depth's pairs (their tokens ``tok``) written, the
        ends of the key, query and token sequences kept."""
        written = [self.write(m, z, tok, k)
                   for (m, z), k in zip(self._masses(state), keys, strict=True)]
        return self._state(written, u_last.to(state.last.dtype), *seqs)

    def _state(self, written: list[tuple[Tensor, Tensor]], last: Tensor, keys: Tensor,
               queries: Tensor, toks: Tensor) -> PointerState:
        """The state from each depth's (mass, z), the last input, and the key, query and token
        sequences up to now (whose ends a span or delay keeps)."""
        mass, z = written[0]
        if not self.extended:
            return PointerState(mass, z, last)
        L1, W = self.span - 1, self.delay
        B, dk = last.shape[0], self.dk
        spans = written[1:]
        return PointerSpanState(
            mass, z, last,
            torch.stack([m for m, _ in spans], 1) if spans
            else mass.new_zeros(B, 0, dk, self.vocab),
            torch.stack([zz for _, zz in spans], 1) if spans else z.new_zeros(B, 0, dk),
            _tail(keys, W + L1), _tail(queries, L1), _tail(toks, W).float())

    def state_of(self, u: Tensor, ids: Tensor) -> PointerState:
        """The state after reading ``ids`` (B, p) from an empty one, their key inputs ``u``
        (B, p, W), in one write per depth (no reads): what `forward` leaves, for a long
        prefix whose pairs should keep their gradient."""
        B, p = ids.shape
        W = self.delay
        fk = self.write_features(u[:, :-1])  # the key of x_t at depth d: features of u_{t-d}
        empty = self.init_state(B, u.device, u.dtype)
        # depth d holds x_t for d <= t <= p - 1 - W (the last W not yet written)
        written = [self.write(m, z, ids[:, d:max(d, p - W)], fk[:, :max(0, p - W - d)])
                   for d, (m, z) in enumerate(self._masses(empty), 1)]
        if not self.extended:
            return PointerState(*written[0], u[:, -1])
        # the sequences' ends, after the zero histories of an empty state
        return self._state(written, u[:, -1], torch.cat((fk.new_zeros(B, W + self.span - 1,
                                                                     self.dk), fk), 1),
                           torch.cat((fk.new_zeros(B, self.span - 1, self.dk),
                                      self.query_features(u)), 1),
                           torch.cat((ids.new_zeros(B, W), ids), 1))

    def _read(self, fq: Tensor, keys: Tensor, tok: Tensor, mass: Tensor, z: Tensor, r0: int
              ) -> tuple[Tensor, Tensor]:
        """The read (num (B, r, V), den (B, r)) of queries fq (B, r, dk) at the chunk's
        positions r0..: the pairs of earlier chunks (mass, z) and the chunk's pairs j <= s
        (keys (B, n, dk), tok (B, n))."""
        B, n = tok.shape
        num = fq @ mass
        den = (fq @ z[..., None])[..., 0]
        a = (fq @ keys.transpose(1, 2)).tril(r0)  # (B, r, n): pairs j <= s
        num = num.scatter_add(2, tok[:, None, :].expand(B, a.shape[1], n), a)
        return num, den + a.sum(-1)

    def _read_at(self, fq: Tensor, keys: Tensor, tok: Tensor, mass: Tensor, z: Tensor,
                 at: Tensor, r0: int, diag: int) -> tuple[Tensor, Tensor]:
        """`_read` at one token per position (``at`` (B, r)) and over the chunk's pairs
        j <= s + ``diag``: (num, den), both (B, r)."""
        B, dk = fq.shape[0], self.dk
        b = (fq @ keys.transpose(1, 2)).tril(r0 + diag)
        num = (fq * mass.gather(2, at[:, None, :].expand(B, dk, at.shape[1])).transpose(1, 2)
               ).sum(-1) + (b * (at[:, :, None] == tok[:, None, :])).sum(-1)
        return num, (fq @ z[..., None])[..., 0] + b.sum(-1)

    def _momentum(self, prev: Tensor, queries: list[Tensor], keys: list[Tensor],
                  pair_tok: Tensor, tok: Tensor, masses: list[tuple[Tensor, Tensor]], depth: int,
                  r0: int) -> Tensor:
        """The gate input "momentum" of the read of ``depth`` at the chunk's positions s = r0..
        (B, r). Depth 1: the read at s - 1 (its query from u_{s-1} = ``prev``) at the token x_s
        that came. Depth d: the read of depth d - 1 at s - 1, which has depth d's query, at
        x_s (high while the span read so far was right)."""
        here = tok[:, r0:]
        if depth == 1:
            fq, k, (m, z) = self.query_features(prev[:, r0:]), keys[0], masses[0]
        else:
            fq, k, (m, z) = queries[depth - 1][:, r0:], keys[depth - 2], masses[depth - 2]
        return ratio(*self._read_at(fq, k, pair_tok, m, z, here, r0, -1))

    def forward(self, hidden: Tensor, embedded: Tensor, ids: Tensor, logits: Tensor,
                state: PointerState, started: Tensor, last_only: bool = False
                ) -> tuple[Tensor, PointerState]:
        """hidden, embedded (B, T, d), ids (B, T), logits (B, T, V) (or (B, 1, V) with
        ``last_only``: the last position's), ``started`` (B,) bool: whether a token came before
        this chunk (else its first token has no predecessor to pair with). Returns the mixed
        log-probabilities as logits (the logits' dtype) and the new state."""
        T = hidden.shape[1]
        u = self.inputs(hidden, embedded)
        outs = []
        for c0 in range(0, T, CHUNK):
            c1 = min(T, c0 + CHUNK)
            n = c1 - c0
            prev, fk = self._pairs(u, state.last, c0, c1, started)
            tok = ids[:, c0:c1]
            keys, queries, pair_tok, seqs = self._depths(state, fk, u[:, c0:c1], tok)
            if not last_only or c1 == T:
                r0 = 0 if not last_only else n - 1
                masses = self._masses(state)
                gates, nums, dens = [], [], []
                for d in range(1, self.span + 1):
                    num, den = self._read(queries[d - 1][:, r0:], keys[d - 1], pair_tok,
                                          *masses[d - 1], r0)
                    gates.append(self.gate(
                        hidden[:, c0 + r0:c1], focus_of(num, den) if self.uses("focus") else None,
                        self._momentum(prev, queries, keys, pair_tok, tok, masses, d, r0)
                        if self.uses("momentum") else None, d)[..., None])
                    nums.append(num)
                    dens.append(den[..., None])
                chunk_logits = logits if last_only else logits[:, c0:c1]
                outs.append(mix_log(torch.log_softmax(chunk_logits.float(), -1), gates, nums,
                                        dens).to(logits.dtype))
            state = self._advance(state, u[:, c1 - 1], pair_tok, keys, seqs)
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return out, state

    def score_targets(self, hidden: Tensor, embedded: Tensor, ids: Tensor, targets: Tensor,
                      logits: Tensor, state: PointerState, started: Tensor
                      ) -> tuple[Tensor, Tensor, PointerState]:
        """`forward`'s log-probabilities at the targets alone, for training: ``targets``
        (B, T) the token that followed each position. Returns (log p of each target with the
        pointer, without it (the model's own), both (B, T) float32; the new state), with no
        (B, T, V) mixture: the read is taken at the target's column only (and "focus" from
        the masses' Gram matrix), several times faster than `forward` then a gather."""
        T = hidden.shape[1]
        u = self.inputs(hidden, embedded)
        mixed, plain = [], []
        for c0 in range(0, T, CHUNK):
            c1 = min(T, c0 + CHUNK)
            prev, fk = self._pairs(u, state.last, c0, c1, started)
            tok, want = ids[:, c0:c1], targets[:, c0:c1]
            keys, queries, pair_tok, seqs = self._depths(state, fk, u[:, c0:c1], tok)
            masses = self._masses(state)
            lg = logits[:, c0:c1].float()
            lp = lg.gather(-1, want[..., None])[..., 0] - lg.logsumexp(-1)  # (B, n)
            gates, nums, dens = [], [], []
            for d in range(1, self.span + 1):
                fq, k, (mass, z) = queries[d - 1], keys[d - 1], masses[d - 1]
                num, den = self._read_at(fq, k, pair_tok, mass, z, want, 0, 0)
                focus = None
                if self.uses("focus"):
                    a = (fq @ k.transpose(1, 2)).tril()  # (B, n, n): pairs j <= s
                    focus = log_ratio(self._sum_squares(fq, a, mass, pair_tok), den * den)
                gates.append(self.gate(hidden[:, c0:c1], focus,
                                       self._momentum(prev, queries, keys, pair_tok, tok,
                                                      masses, d, 0)
                                       if self.uses("momentum") else None, d))
                nums.append(num)
                dens.append(den)
            mixed.append(mix_log(lp, gates, nums, dens))
            plain.append(lp)
            state = self._advance(state, u[:, c1 - 1], pair_tok, keys, seqs)
        return torch.cat(mixed, 1), torch.cat(plain, 1), state

    def _sum_squares(self, fq: Tensor, a: Tensor, mass: Tensor, tok: Tensor) -> Tensor:
        """Σ_v num_s(v)² (B, n) of the reads num_s = fq_s M + Σ_j a_sj e_{tok_j}: the earlier
        chunks' part through M Mᵀ, the cross terms, and the chunk's pairs among themselves."""
        B, n = tok.shape
        same = (tok[:, :, None] == tok[:, None, :]).float()
        cols = fq @ mass.gather(2, tok[:, None, :].expand(B, self.dk, n))  # (B, n, n)
        return (((fq @ (mass @ mass.transpose(1, 2))) * fq).sum(-1)
                + 2 * (a * cols).sum(-1) + ((a @ same) * a).sum(-1))

    # slots (see newllm.slots) ---------------------------------------------------------------
    def slot_init(self, slots: int, device: Any, dtype: torch.dtype) -> PointerSlots:
        s = self.init_state(slots, device, dtype)
        kind = PointerSpanSlots if self.extended else PointerSlots
        return kind(**state_tensors(s))

    def slot_load(self, buf: PointerSlots, row: int, state: PointerState) -> None:
        for name, t in state_tensors(state).items():
            getattr(buf, name)[row] = t[0]

    def slot_extract(self, buf: PointerSlots, row: int) -> PointerState:
        return self.state_type()(**{name: t[row:row + 1].clone()
                                    for name, t in state_tensors(buf).items()})

    def slot_backup(self, buf: PointerSlots, step: Any, ids: Tensor) -> Any:
        """What undoes a step's writes: the columns it adds to, the normalisers, the inputs."""
        rows = step.rows
        if isinstance(buf, PointerSpanSlots):
            col = self._written_token(buf, step, ids)
            saved = [(buf.mass, (rows, slice(None), col)), (buf.span_mass,
                     (rows, slice(None), slice(None), col))]
            saved += [(getattr(buf, n), (rows,)) for n in ("z", "last", "span_z", "span_keys",
                                                           "span_queries", "span_tokens")]
        else:
            saved = [(buf.mass, (rows, slice(None), ids)), (buf.z, (rows,)), (buf.last, (rows,))]
        values = [t[i].clone() for t, i in saved]

        def restore() -> None:
            for (t, i), v in zip(saved, values, strict=True):
                t[i] = v
        return restore

    def _written_token(self, buf: PointerSpanSlots, step: Any, ids: Tensor) -> Tensor:
        """The token each row's step writes: its own, or W tokens back with a delay."""
        return step.take(buf.span_tokens)[:, 0].long() if self.delay else ids

    def slot_step(self, hidden: Tensor, embedded: Tensor, ids: Tensor, logits: Tensor,
                  buf: PointerSlots, step: Any) -> Tensor:
        """One token per row: hidden, embedded (N, d), ids (N,), logits (N, V) -> mixed
        log-probabilities (N, V); writes each row's pairs, then reads."""
        rows = step.rows
        dk = torch.arange(self.dk, device=rows.device)
        u = self.inputs(hidden, embedded)
        prev = step.take(buf.last).to(u.dtype)
        fk = self.write_features(prev)
        fk = fk * (step.position > 0).view(-1, 1).float()
        fq = self.query_features(u)  # (N, dk)
        L = self.span
        col, key = ids, fk  # the token written and its key at depth 1
        if isinstance(buf, PointerSpanSlots):
            # depth d writes x_{s-W} under u_{s-W-d}'s keys and reads with u_{s-d+1}'s
            col = self._written_token(buf, step, ids)
            keys = torch.cat((step.take(buf.span_keys), fk[:, None]), 1)[:, :L].flip(1)
            key = keys[:, 0]
            span_k = keys[:, 1:]  # (N, L-1, dk): [:, d - 2] for depth d
            span_q = step.take(buf.span_queries).flip(1)
        moments: list[Tensor | None] = [None] * L
        if self.uses("momentum"):  # the reads at this token, before it is written
            fqp = self.query_features(prev)
            here = buf.mass[rows, :, ids]  # (N, dk)
            moments[0] = ratio((fqp * here).sum(-1), (fqp * step.take(buf.z)).sum(-1))
            if L > 1:
                assert isinstance(buf, PointerSpanSlots)
                cols = torch.cat((here[:, None], buf.span_mass[rows, :-1, :, ids]),
                                 1)  # depths 1..L-1
                zs = torch.cat((step.take(buf.z)[:, None], step.take(buf.span_z)[:, :-1]), 1)
                m = ratio((span_q * cols).sum(-1), (span_q * zs).sum(-1))  # (N, L-1)
                moments[1:] = list(m.unbind(1))
        buf.mass.index_put_((rows[:, None], dk[None, :], col[:, None]), key, accumulate=True)
        buf.z[rows] += key
        buf.last[rows] = u.to(buf.last.dtype)
        nums = [(fq[:, None, :] @ step.take(buf.mass))[:, 0]]
        dens = [(fq * step.take(buf.z)).sum(-1)]
        if isinstance(buf, PointerSpanSlots):
            if L > 1:
                depth = torch.arange(L - 1, device=rows.device)
                buf.span_mass.index_put_((rows[:, None, None], depth[None, :, None],
                                          dk[None, None, :], col[:, None, None]), span_k,
                                         accumulate=True)
                buf.span_z[rows] += span_k
                buf.span_queries[rows] = torch.cat((step.take(buf.span_queries)[:, 1:],
                                                    fq[:, None]), 1)
                masses = step.take(buf.span_mass)  # (N, L-1, dk, V)
                nums += list((span_q[:, :, None, :] @ masses)[:, :, 0].unbind(1))
                dens += list((span_q * step.take(buf.span_z)).sum(-1).unbind(1))
            buf.span_keys[rows] = _tail(torch.cat((step.take(buf.span_keys), fk[:, None]), 1),
                                        self.delay + L - 1)
            buf.span_tokens[rows] = _tail(torch.cat((step.take(buf.span_tokens),
                                                     ids[:, None].float()), 1), self.delay)
        gates = [self.gate(hidden, focus_of(num, den) if self.uses("focus") else None,
                           moments[d], d + 1)[..., None]
                 for d, (num, den) in enumerate(zip(nums, dens, strict=True))]
        return mix_log(torch.log_softmax(logits.float(), -1), gates, nums,
                           [den[..., None] for den in dens]).to(logits.dtype)


def _tail(x: Tensor, k: int) -> Tensor:
    """The last ``k`` entries of x (B, n, ...) along dim 1 (none for k = 0)."""
    return x[:, x.shape[1] - k:]


def add_pointer(model: Any, dim: int = 64, token_keys: bool = False,
                gate_inputs: tuple[str, ...] = (), span: int = 1) -> Any:
    """A copy of ``model`` (a `TransformerLM` without a pointer) with a new pointer cache of
    ``dim`` features at its initial weights, every other weight the model's."""
    if model.pointer is not None:
        raise ValueError(f"the model already has a pointer (pointer_dim "
                         f"{model.config.pointer_dim})")
    return _copy(model, model.config.replace(
        pointer_dim=dim, pointer_token_keys=token_keys, pointer_gate_inputs=tuple(gate_inputs),
        pointer_span=span), "pointer.")


def widen_span(model: Any, span: int, warm: bool = False) -> Any:
    """A copy of ``model`` (with a pointer of span 1) whose pointer also reads the ``span`` - 1
    tokens after each pair it finds. The new gates start nearly closed (at first it predicts
    as ``model`` does), or with ``warm`` as copies of the first read's gate (each depth then
    opens as the first read would on its own read's focus and momentum: a start that training
    reaches in far fewer steps)."""
    if model.pointer is None or model.config.pointer_span != 1:
        raise ValueError("widen_span takes a model with a pointer of span 1 (pointer_span "
                         f"{model.config.pointer_span}, pointer_dim {model.config.pointer_dim})")
    if span < 2:
        raise ValueError(f"span must be >= 2, got {span}")
    out = _copy(model, model.config.replace(pointer_span=span), "pointer.span_")
    if warm:
        p = out.pointer
        assert p.span_gate is not None
        with torch.no_grad():
            p.span_gate.weight.copy_(p.mix_gate.weight.expand_as(p.span_gate.weight))
            p.span_gate.bias.fill_(float(p.mix_gate.bias))
            if p.span_read is not None:
                p.span_read.copy_(p.gate_read.expand_as(p.span_read))
    return out


def with_delay(model: Any, delay: int) -> Any:
    """A copy of ``model`` (with a pointer) whose pointer reads only pairs written at least
    ``delay`` tokens before (`ModelConfig.pointer_delay`); the same weights."""
    if model.pointer is None:
        raise ValueError("with_delay takes a model with a pointer (pointer_dim 0)")
    return _copy(model, model.config.replace(pointer_delay=delay), None)


def _copy(model: Any, config: Any, new: str | None) -> Any:
    """A `TransformerLM` of ``config`` with ``model``'s weights; the weights whose names start
    with ``new`` (none if None) are new ones, at their initial values."""
    from newllm.model import TransformerLM

    out = TransformerLM(config)
    missing = out.load_state_dict(model.state_dict(), strict=new is None).missing_keys
    assert new is None or all(k.startswith(new) for k in missing), missing
    return out.to(next(model.parameters()).dtype)


def remove_pointer(model: Any) -> Any:
    """A copy of ``model`` without its pointer cache: the same model's own predictions."""
    from newllm.model import TransformerLM

    out = TransformerLM(model.config.replace(pointer_dim=0, pointer_token_keys=False,
                                             pointer_gate_inputs=(), pointer_span=1,
                                             pointer_delay=0))
    out.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("pointer.")})
    return out.to(next(model.parameters()).dtype)


@torch.no_grad()
def pointer_reference(pointer: PointerCache, hidden: Tensor, embedded: Tensor, ids: Tensor,
                      logits: Tensor, state: PointerState, started: bool) -> Tensor:
    """The slow, plain pointer for one row: hidden, embedded (T, d), ids (T,), logits (T, V);
    token by token, a pair written into explicit sums, then read. Returns (T, V) log-probs.

    Depth d (1..span) keeps its own sums: at t, the token x_{t-W} is written under the key of
    u_{t-W-d} (W = the delay), and depth d reads with the query of u_{t-d+1}; the weights are
    softmax(0, g_1, .., g_span) over the model and the depths that have read something."""
    L = pointer.span
    masses = [state.mass[0].clone()]
    zs = [state.z[0].clone()]
    keys: list[Tensor] = []  # β φ(W_k u) of u_{t-W-L} .. u_{t-1}
    queries: list[Tensor] = []  # φ(W_q u) of u_{t-L+1} .. u_{t-1}
    pending: list[int] = []  # x_{t-W} .. x_{t-1}
    if isinstance(state, PointerSpanState):
        masses += [m.clone() for m in state.span_mass[0]]
        zs += [z.clone() for z in state.span_z[0]]
        keys += list(state.span_keys[0])
        queries += list(state.span_queries[0])
        pending += [int(x) for x in state.span_tokens[0]]
    prev = state.last[0] if started else None
    keys.append(pointer.write_features(prev) if prev is not None
                else torch.zeros(pointer.dk))
    out = []
    for t in range(ids.shape[0]):
        x = int(ids[t])
        u = pointer.inputs(hidden[t], embedded[t])
        moments = [torch.zeros(())] * L
        if prev is not None:
            qp = pointer.query_features(prev)
            if float(qp @ zs[0]) > 0:  # what the previous read gave the token that came
                moments[0] = (qp @ masses[0][:, x]) / (qp @ zs[0])
        for d in range(2, L + 1):  # the read of depth d - 1 at t - 1, with depth d's query
            q = queries[L - d]
            if float(q @ zs[d - 2]) > 0:
                moments[d - 1] = (q @ masses[d - 2][:, x]) / (q @ zs[d - 2])
        pending.append(x)
        written, pending = pending[0], pending[1:]
        for d in range(1, L + 1):
            masses[d - 1][:, written] += keys[L - d]
            zs[d - 1] += keys[L - d]
        q_now = pointer.query_features(u)
        p = torch.softmax(logits[t].float(), -1)
        weights, reads = [torch.zeros(())], [p]
        for d in range(1, L + 1):
            q = q_now if d == 1 else queries[L - d]
            if float(q @ zs[d - 1]) > 0:
                p_copy = (q @ masses[d - 1]) / (q @ zs[d - 1])
                inputs = {"focus": torch.log((p_copy ** 2).sum()), "momentum": moments[d - 1]}
                weights.append(pointer.gate(hidden[t], inputs["focus"], inputs["momentum"], d))
                reads.append(p_copy)
        w = torch.softmax(torch.stack(weights), 0)
        out.append(torch.log(sum(wi * r for wi, r in zip(w, reads, strict=True))))
        keys = (keys + [pointer.write_features(u)])[1:]
        queries = (queries + [q_now])[1:] if L > 1 else queries
        prev = u
    return torch.stack(out)
