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

It is a continuous cache (Grave et al., 2017) with learned projections, compressed into a fixed
size: dk · V floats per session however long the conversation. A model with a pointer returns log p
as its logits (log-probabilities are logits: softmax gives p back), so sampling, scoring and
training need no change. Every pair is written before the read at its token's position, so a
read at s sees the tokens up to s. The state (`PointerState`) is part of the `ModelState`
(``pointer.mass``, ``pointer.z``, ``pointer.last``): saved in memory files, moved with
sessions, batched in `newllm.slots`. `pointer_reference` is the plain token-by-token version
the tests hold the chunked one to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.layers.memory import elu1

CHUNK = 256  # positions read together in `PointerCache.forward` (a (chunk x chunk) score matrix)
POINTER_GATE_INPUTS = ("focus", "momentum")  # what the mixing gate can read besides h


@dataclass(frozen=True)
class PointerState:
    mass: Tensor  # (B, dk, V) float32: Σ β φ(k) per token written
    z: Tensor  # (B, dk) float32: Σ β φ(k)
    last: Tensor  # (B, W) the keys' input at the last position read (zeros before any token)


@dataclass
class PointerSlots:
    """The pointer's state for a slot batch (`newllm.slots`): every tensor (slots, ...)."""

    mass: Tensor
    z: Tensor
    last: Tensor


def mix(logits: Tensor, gate: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """log((1 − λ) softmax(logits) + λ num / den) in float32, λ = sigmoid(gate) where den > 0
    and 0 elsewhere: logits (..., V), gate and den (...), num (..., V) >= 0."""
    return mix_log(torch.log_softmax(logits.float(), -1), gate[..., None], num, den[..., None])


def mix_log(lp: Tensor, gate: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """log((1 − λ) exp(lp) + λ num / den), λ = sigmoid(gate), where den > 0 (else lp), on
    broadcastable tensors: the mixture at every token (`mix`) or at the targets alone."""
    on = den > 0
    ok = num > 0
    safe_num = torch.where(ok, num, torch.ones_like(num))
    safe_den = torch.where(on, den, torch.ones_like(den))
    lp_copy = torch.where(ok, torch.log(safe_num) - torch.log(safe_den),
                          torch.full_like(num, -torch.inf))
    both = torch.logaddexp(F.logsigmoid(-gate) + lp, F.logsigmoid(gate) + lp_copy)
    return torch.where(on, both, lp)


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
        self.width = d + config.hidden_size if self.token_keys else d
        self.query = nn.Linear(self.width, dk)
        self.key = nn.Linear(self.width, dk)
        self.write_gate = nn.Linear(d, 1)
        self.mix_gate = nn.Linear(d, 1)
        self.gate_inputs = tuple(config.pointer_gate_inputs)
        # the gate's weight for each of gate_inputs (none without them)
        self.gate_read = (nn.Parameter(torch.zeros(len(self.gate_inputs)))
                          if self.gate_inputs else None)

    def reset_parameters(self, std: float) -> None:
        """Small projections, zero biases, and a mixing gate that starts nearly closed
        (λ ≈ 0.05), so a pointer added to a trained model starts close to the model alone."""
        for lin in (self.query, self.key, self.write_gate, self.mix_gate):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        nn.init.constant_(self.mix_gate.bias, -3.0)
        if self.gate_read is not None:
            nn.init.zeros_(self.gate_read)

    # state ---------------------------------------------------------------------------------
    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return {"mass": (batch_size, self.dk, self.vocab), "z": (batch_size, self.dk),
                "last": (batch_size, self.width)}

    def state_dtypes(self, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
        return {"mass": torch.float32, "z": torch.float32, "last": model_dtype}

    def init_state(self, batch_size: int, device: Any, dtype: torch.dtype) -> PointerState:
        shapes, dtypes = self.state_shapes(batch_size), self.state_dtypes(dtype)
        return PointerState(**{n: torch.zeros(s, device=device, dtype=dtypes[n])
                               for n, s in shapes.items()})

    # the computation -----------------------------------------------------------------------
    def inputs(self, hidden: Tensor, embedded: Tensor) -> Tensor:
        """The keys' and queries' input u (..., W) from the final hidden states (..., d) and
        the tokens' input embeddings (..., hidden_size)."""
        return torch.cat((hidden, embedded), -1) if self.token_keys else hidden

    def write_features(self, u: Tensor) -> Tensor:
        """β φ(W_k u) (..., dk), float32."""
        return elu1(self.key(u)).float() * torch.sigmoid(self.write_gate(u[..., :self.hidden]))

    def gate(self, hidden: Tensor, focus: Tensor | None, momentum: Tensor | None) -> Tensor:
        """The mixing gate's logit (...) in float32: w_λ · h + b_λ, plus each gate input
        (`pointer_gate_inputs`; the ones not used may be None) times its weight."""
        g = self.mix_gate(hidden)[..., 0].float()
        if self.gate_read is not None:
            inputs = {"focus": focus, "momentum": momentum}
            for i, name in enumerate(self.gate_inputs):
                x = inputs[name]
                assert x is not None, f"the gate reads {name}"
                g = g + self.gate_read[i].float() * x
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

    def write(self, mass: Tensor, z: Tensor, tok: Tensor, fk: Tensor) -> tuple[Tensor, Tensor]:
        """(mass, z) with the pairs (fk (B, n, dk), tok (B, n)) added."""
        B, n = tok.shape
        return (mass.scatter_add(2, tok[:, None, :].expand(B, self.dk, n), fk.transpose(1, 2)),
                z + fk.sum(1))

    def _momentum(self, prev: Tensor, fk: Tensor, tok: Tensor, mass: Tensor, z: Tensor,
                  r0: int) -> Tensor:
        """p_copy_{s-1}(x_s) for the chunk's positions s = r0.. (B, r): the read at s - 1
        (its query from u_{s-1} = ``prev``, the pairs before s: ``mass``/``z`` from earlier
        chunks and this chunk's pairs j < s) at the token x_s that came."""
        B, dk = fk.shape[0], self.dk
        here = tok[:, r0:]
        fqp = elu1(self.query(prev[:, r0:])).float()  # (B, r, dk)
        b = (fqp @ fk.transpose(1, 2)).tril(r0 - 1)  # (B, r, n): pairs j < s
        num = (fqp * mass.gather(2, here[:, None, :].expand(B, dk, here.shape[1]))
               .transpose(1, 2)).sum(-1) + (b * (here[:, :, None] == tok[:, None, :])).sum(-1)
        den = (fqp @ z[..., None])[..., 0] + b.sum(-1)
        return ratio(num, den)

    def forward(self, hidden: Tensor, embedded: Tensor, ids: Tensor, logits: Tensor,
                state: PointerState, started: Tensor, last_only: bool = False
                ) -> tuple[Tensor, PointerState]:
        """hidden, embedded (B, T, d), ids (B, T), logits (B, T, V) (or (B, 1, V) with
        ``last_only``: the last position's), ``started`` (B,) bool: whether a token came before
        this chunk (else its first token has no predecessor to pair with). Returns the mixed
        log-probabilities as logits (the logits' dtype) and the new state."""
        B, T, _ = hidden.shape
        u = self.inputs(hidden, embedded)
        mass, z, last = state.mass, state.z, state.last
        outs = []
        for c0 in range(0, T, CHUNK):
            c1 = min(T, c0 + CHUNK)
            n = c1 - c0
            prev, fk = self._pairs(u, last, c0, c1, started)
            tok = ids[:, c0:c1]
            if not last_only or c1 == T:
                r0 = 0 if not last_only else n - 1
                fq = elu1(self.query(u[:, c0 + r0:c1])).float()  # (B, r, dk)
                num = fq @ mass  # (B, r, V): what earlier chunks wrote
                den = (fq @ z[..., None])[..., 0]
                a = (fq @ fk.transpose(1, 2)).tril(r0)  # (B, r, n): pairs j <= s
                num = num.scatter_add(2, tok[:, None, :].expand(B, a.shape[1], n), a)
                den = den + a.sum(-1)
                gate = self.gate(
                    hidden[:, c0 + r0:c1],
                    focus_of(num, den) if self.uses("focus") else None,
                    self._momentum(prev, fk, tok, mass, z, r0) if self.uses("momentum") else None)
                chunk_logits = logits if last_only else logits[:, c0:c1]
                outs.append(mix(chunk_logits, gate, num, den).to(logits.dtype))
            mass, z = self.write(mass, z, tok, fk)
            last = u[:, c1 - 1].to(last.dtype)
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        return out, PointerState(mass, z, last)

    def score_targets(self, hidden: Tensor, embedded: Tensor, ids: Tensor, targets: Tensor,
                      logits: Tensor, state: PointerState, started: Tensor
                      ) -> tuple[Tensor, Tensor, PointerState]:
        """`forward`'s log-probabilities at the targets alone, for training: ``targets``
        (B, T) the token that followed each position. Returns (log p of each target with the
        pointer, without it (the model's own), both (B, T) float32; the new state), with no
        (B, T, V) mixture: the read is taken at the target's column only (and "focus" from
        the masses' Gram matrix), several times faster than `forward` then a gather."""
        B, T, _ = hidden.shape
        u = self.inputs(hidden, embedded)
        mass, z, last = state.mass, state.z, state.last
        dk = self.dk
        mixed, plain = [], []
        for c0 in range(0, T, CHUNK):
            c1 = min(T, c0 + CHUNK)
            n = c1 - c0
            prev, fk = self._pairs(u, last, c0, c1, started)
            tok, want = ids[:, c0:c1], targets[:, c0:c1]
            lg = logits[:, c0:c1].float()
            lp = lg.gather(-1, want[..., None])[..., 0] - lg.logsumexp(-1)  # (B, n)
            fq = elu1(self.query(u[:, c0:c1])).float()  # (B, n, dk)
            a = (fq @ fk.transpose(1, 2)).tril()  # (B, n, n): pairs j <= s
            num = (fq * mass.gather(2, want[:, None, :].expand(B, dk, n)).transpose(1, 2)
                   ).sum(-1) + (a * (want[:, :, None] == tok[:, None, :])).sum(-1)
            den = (fq @ z[..., None])[..., 0] + a.sum(-1)
            focus = None
            if self.uses("focus"):
                # Σ_v num_s(v)² with num_s = fq_s M + Σ_j a_sj e_{tok_j}: the earlier chunks'
                # part through M Mᵀ, the cross terms, and the chunk's pairs among themselves
                same = (tok[:, :, None] == tok[:, None, :]).float()
                cols = fq @ mass.gather(2, tok[:, None, :].expand(B, dk, n))  # (B, n, n)
                sq = (((fq @ (mass @ mass.transpose(1, 2))) * fq).sum(-1)
                      + 2 * (a * cols).sum(-1) + ((a @ same) * a).sum(-1))
                focus = log_ratio(sq, den * den)
            gate = self.gate(hidden[:, c0:c1], focus,
                             self._momentum(prev, fk, tok, mass, z, 0)
                             if self.uses("momentum") else None)
            mixed.append(mix_log(lp, gate, num, den))
            plain.append(lp)
            mass, z = self.write(mass, z, tok, fk)
            last = u[:, c1 - 1].to(last.dtype)
        return torch.cat(mixed, 1), torch.cat(plain, 1), PointerState(mass, z, last)

    # slots (see newllm.slots) ---------------------------------------------------------------
    def slot_init(self, slots: int, device: Any, dtype: torch.dtype) -> PointerSlots:
        s = self.init_state(slots, device, dtype)
        return PointerSlots(s.mass, s.z, s.last)

    def slot_load(self, buf: PointerSlots, row: int, state: PointerState) -> None:
        buf.mass[row], buf.z[row], buf.last[row] = state.mass[0], state.z[0], state.last[0]

    def slot_extract(self, buf: PointerSlots, row: int) -> PointerState:
        return PointerState(buf.mass[row:row + 1].clone(), buf.z[row:row + 1].clone(),
                            buf.last[row:row + 1].clone())

    def slot_backup(self, buf: PointerSlots, step: Any, ids: Tensor) -> Any:
        """What undoes a step's writes: the columns it adds to, the normalisers, the inputs."""
        rows = step.rows
        saved = (buf.mass[rows, :, ids].clone(), buf.z[rows].clone(), buf.last[rows].clone())

        def restore() -> None:
            buf.mass[rows, :, ids], buf.z[rows], buf.last[rows] = saved
        return restore

    def slot_step(self, hidden: Tensor, embedded: Tensor, ids: Tensor, logits: Tensor,
                  buf: PointerSlots, step: Any) -> Tensor:
        """One token per row: hidden, embedded (N, d), ids (N,), logits (N, V) -> mixed
        log-probabilities (N, V); writes each row's pair, then reads."""
        rows = step.rows
        u = self.inputs(hidden, embedded)
        prev = step.take(buf.last).to(u.dtype)
        fk = self.write_features(prev)
        fk = fk * (step.position > 0).view(-1, 1).float()
        momentum = None
        if self.uses("momentum"):  # the previous read at this token, before it is written
            fqp = elu1(self.query(prev)).float()
            momentum = ratio((fqp * buf.mass[rows, :, ids]).sum(-1),
                             (fqp * step.take(buf.z)).sum(-1))
        buf.mass.index_put_((rows[:, None], torch.arange(self.dk, device=rows.device)[None, :],
                             ids[:, None]), fk, accumulate=True)
        buf.z[rows] += fk
        buf.last[rows] = u.to(buf.last.dtype)
        fq = elu1(self.query(u)).float()  # (N, dk)
        num = (fq[:, None, :] @ step.take(buf.mass))[:, 0]  # (N, V)
        den = (fq * step.take(buf.z)).sum(-1)
        gate = self.gate(hidden, focus_of(num, den) if self.uses("focus") else None, momentum)
        return mix(logits, gate, num, den).to(logits.dtype)


def add_pointer(model: Any, dim: int = 64, token_keys: bool = False,
                gate_inputs: tuple[str, ...] = ()) -> Any:
    """A copy of ``model`` (a `TransformerLM` without a pointer) with a new pointer cache of
    ``dim`` features at its initial weights, every other weight the model's."""
    from newllm.model import TransformerLM

    if model.pointer is not None:
        raise ValueError(f"the model already has a pointer (pointer_dim "
                         f"{model.config.pointer_dim})")
    out = TransformerLM(model.config.replace(pointer_dim=dim, pointer_token_keys=token_keys,
                                             pointer_gate_inputs=tuple(gate_inputs)))
    missing = out.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pointer.") for k in missing), missing
    return out.to(next(model.parameters()).dtype)


def remove_pointer(model: Any) -> Any:
    """A copy of ``model`` without its pointer cache: the same model's own predictions."""
    from newllm.model import TransformerLM

    out = TransformerLM(model.config.replace(pointer_dim=0, pointer_token_keys=False,
                                             pointer_gate_inputs=()))
    out.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("pointer.")})
    return out.to(next(model.parameters()).dtype)


@torch.no_grad()
def pointer_reference(pointer: PointerCache, hidden: Tensor, embedded: Tensor, ids: Tensor,
                      logits: Tensor, state: PointerState, started: bool) -> Tensor:
    """The slow, plain pointer for one row: hidden, embedded (T, d), ids (T,), logits (T, V);
    token by token, a pair written into explicit sums, then read. Returns (T, V) log-probs."""
    mass, z = state.mass[0].clone(), state.z[0].clone()
    prev = state.last[0] if started else None
    out = []
    for t in range(ids.shape[0]):
        u = pointer.inputs(hidden[t], embedded[t])
        momentum = torch.zeros(())
        if prev is not None:
            qp = elu1(pointer.query(prev))
            if float(qp @ z) > 0:  # what the previous read gave the token that came
                momentum = (qp @ mass[:, int(ids[t])]) / (qp @ z)
            k = elu1(pointer.key(prev)) * torch.sigmoid(pointer.write_gate(prev[:pointer.hidden]))
            mass[:, int(ids[t])] += k
            z += k
        p = torch.softmax(logits[t].float(), -1)
        if float(z.sum()) > 0:
            q = elu1(pointer.query(u))
            p_copy = (q @ mass) / (q @ z)
            g = pointer.mix_gate(hidden[t])[0]
            inputs = {"focus": torch.log((p_copy ** 2).sum()), "momentum": momentum}
            for i, name in enumerate(pointer.gate_inputs):
                g = g + pointer.gate_read[i] * inputs[name]
            lam = torch.sigmoid(g)
            p = (1 - lam) * p + lam * p_copy
        out.append(torch.log(p))
        prev = u
    return torch.stack(out)
