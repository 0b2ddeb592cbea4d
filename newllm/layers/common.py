"""Pieces shared by the token mixers: the per-call `Step` (and `SlotStep`, its batched-decode
counterpart), rotary embeddings, the GPT-NeoX QKV split, causal attention with an offset, a
growable key/value buffer with value semantics, and the padded-buffer helpers of slot decoding.

Shape letters: B batch, T new tokens, H heads, D head dim, C layer width, S segment length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.config import ModelConfig


@dataclass(frozen=True)
class Step:
    """What every mixer is told about the current forward call."""

    position: int  # absolute position of the first new token
    contexts: Tensor | None = None  # (B, T, context_dim) context vectors (context models)


@dataclass
class SlotStep:
    """What every mixer is told about one batched decode step over slots (`newllm.slots`).

    Row i of the step decodes one token for slot ``rows[i]``, at absolute position
    ``position[i]``. Positions are known on the host too (``host_position``), so buffer
    lengths, boundaries and masks are decided without reading the device. When the rows are
    consecutive slots (the usual case: `Slots` keeps busy slots packed), ``span`` is that
    slice and buffers are read as views instead of gathered copies.

    A ``fixed`` step (`newllm.slots` with ``compile``) reads nothing from ``host_position``:
    every buffer is read at its full capacity, masks hiding the entries past each row's length,
    so the shape of every tensor depends only on N and the buffers' capacities and one
    compiled step serves every token. Capacities are reserved before it (``slot_reserve``) and
    the writes that happen only at the end of a segment are done after it (``slot_finish``).
    """

    rows: Tensor  # (N,) long, slot index of each row
    position: Tensor  # (N,) long, absolute position of each row's new token
    host_position: tuple[int, ...]
    span: slice | None = None
    contexts: Tensor | None = None  # (N, 1, context_dim) context vectors (context models)
    fixed: bool = False
    _angles: dict[tuple[float, int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def ending(self, period: int) -> list[int]:
        """Indices of the rows whose token is the last of a period (a segment, a chunk)."""
        return [i for i, p in enumerate(self.host_position) if (p + 1) % period == 0]

    def take(self, buffer: Tensor) -> Tensor:
        """The step's rows of a slot buffer (slots, ...) -> (N, ...): a view when consecutive."""
        return buffer[self.span] if self.span is not None else buffer.index_select(0, self.rows)

    def rotate(self, rotary: Rotary, x: Tensor, period: int = 0) -> Tensor:
        """Rotate x (N, H, 1, D) at each row's position (``position % period`` if given)."""
        if rotary.dims == 0:
            return x
        key = (rotary.base, rotary.dims, period)
        if key not in self._angles:
            pos = self.position % period if period else self.position
            cos, sin = _compute_angles_at(rotary.inv_freq, pos, x.device)  # (N, R)
            self._angles[key] = (cos.view(-1, 1, 1, rotary.dims), sin.view(-1, 1, 1, rotary.dims))
        cos, sin = self._angles[key]
        return rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))


def slot_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, fixed: bool) -> Tensor:
    """One query per row over masked keys: q (N, H, 1, D), k, v (N, H, W, D), mask
    (N, 1, 1, W) -> (N, H, 1, D). SDPA, or (``fixed``: compiled) the same softmax attention
    written out, which inductor fuses into a kernel or two instead of four calls of CPU
    flash attention per step (float32 scores and softmax, as SDPA)."""
    if not fixed:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (N, H, 1, W)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ v.float()).to(q.dtype)


def length_mask(lengths: Tensor, width: int) -> Tensor:
    """(N, 1, 1, width) bool: key j of row i is visible when j < lengths[i]."""
    return (torch.arange(width, device=lengths.device) < lengths.view(-1, 1)).view(
        -1, 1, 1, width)


@dataclass
class KVSlots:
    """Padded key/value buffers (slots, H, capacity, D) of a slot batch (`newllm.slots`).

    How many entries of a row are valid follows from that slot's position, so no lengths are
    stored here; entries past a row's length are stale and always masked out.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def zeros(cls, slots: int, heads: int, capacity: int, head_dim: int, device: Any,
              dtype: torch.dtype) -> KVSlots:
        k = torch.zeros(slots, heads, capacity, head_dim, device=device, dtype=dtype)
        return cls(k, k.clone())

    def reserve(self, needed: int) -> None:
        """Room for ``needed`` entries per row (`grown_capacity`; existing entries are kept)."""
        self.k, self.v = grow_time(self.k, needed), grow_time(self.v, needed)

    def load(self, row: int, k: Tensor, v: Tensor) -> None:
        """Put one state's (1, H, n, D) keys and values in ``row`` (the rest zeroed)."""
        n = k.shape[-2]
        self.reserve(n + 1)
        self.k[row].zero_()
        self.v[row].zero_()
        self.k[row, :, :n] = k[0]
        self.v[row, :, :n] = v[0]

    def extract(self, row: int, n: int) -> tuple[Tensor, Tensor]:
        """Copies of the first ``n`` entries of ``row``, as one state's (1, H, n, D)."""
        return self.k[row:row + 1, :, :n].clone(), self.v[row:row + 1, :, :n].clone()


GROW_DOUBLING_UP_TO = 1024  # capacities double up to here, then grow by an eighth ...
GROW_QUANTUM = 128  # ... rounded up to a multiple of this


def grown_capacity(cap: int, needed: int) -> int:
    """The capacity a buffer of ``cap`` entries grows to for ``needed``: doubling from 16 up
    to `GROW_DOUBLING_UP_TO`, then by an eighth at a time, rounded up to a multiple of
    `GROW_QUANTUM`.

    A compiled (``fixed``) step reads a buffer at its whole capacity, so the spare part costs
    time on every token: doubling a 1,025-token cache to 2,048 made pythia-70m's compiled step
    read twice the keys and values it needs. Growing by an eighth keeps the spare part under
    an eighth, and the copies the growths make still add up to a bounded multiple (about nine
    times) of the final capacity."""
    new_cap = max(cap, 16)
    while new_cap < needed:
        if new_cap < GROW_DOUBLING_UP_TO:
            new_cap = min(2 * new_cap, GROW_DOUBLING_UP_TO)
        else:
            new_cap = -(-(new_cap + new_cap // 8) // GROW_QUANTUM) * GROW_QUANTUM
    return new_cap


def grow_time(buffer: Tensor, needed: int) -> Tensor:
    """A slot buffer (slots, H, cap, D) with room for ``needed`` entries: itself, or a copy
    with the capacity grown until it fits (`grown_capacity`; the new part zero)."""
    cap = buffer.shape[2]
    if needed <= cap:
        return buffer
    new_cap = grown_capacity(cap, needed)
    out = buffer.new_zeros(buffer.shape[0], buffer.shape[1], new_cap, buffer.shape[3])
    out[:, :, :cap] = buffer
    return out


# Angle tables are a pure function of (dims, base, start, length, device), so every layer and
# every model shares one small cache: a decode step at position p computes its table once, not
# once per layer. Only short tables (decode steps, short chunks) are kept.
_ANGLES_CACHED_UP_TO = 256


def _compute_angles_at(inv_freq: Tensor, positions: Tensor,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (N, dims) at the given positions (N,): the same arithmetic as below, per row."""
    pos = positions.to(device=device, dtype=torch.float64)
    freqs = (pos[:, None] * inv_freq.to(device=device, dtype=torch.float64)).float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _compute_angles(inv_freq: Tensor, start: int, length: int,
                    device: torch.device) -> tuple[Tensor, Tensor]:
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    freqs = (pos[:, None] * inv_freq.to(device=device, dtype=torch.float64)).float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=64)
def _shared_angles(dims: int, base: float, start: int, length: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False):  # plain tensors: usable later under autograd too
        return _compute_angles(rotary_inv_freq(dims, base), start, length, device)


def rotary_inv_freq(dims: int, base: float) -> Tensor:
    """float32 inverse frequencies (dims / 2,), computed as transformers computes them."""
    return 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims))


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first ``rotary_dims`` dims of each head (rotate_half).

    Angles are computed for just the positions of each call, so memory does not grow with the
    position. The product position x frequency is formed in float64 from float32 frequencies
    (exact for a 24-bit x 24-bit mantissa, hence equal to transformers' float32 product below
    2**24) and stays exact far beyond it, where float32 positions stop being integers.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dims = config.rotary_dims
        self.base = float(config.rotary_base)
        self.inv_freq = rotary_inv_freq(self.dims, self.base)  # not a parameter

    def angles(self, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (length, dims) for positions start .. start+length-1 (short ones cached)."""
        if length <= _ANGLES_CACHED_UP_TO:
            return _shared_angles(self.dims, self.base, start, length, device)
        return _compute_angles(self.inv_freq, start, length, device)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """Rotate x (..., T, D) as if its tokens sat at positions start .. start+T-1."""
        if self.dims == 0:
            return x
        cos, sin = self.angles(start, x.shape[-2], x.device)  # (T, R)
        return self.apply(x, cos.to(x.dtype), sin.to(x.dtype))

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate x (..., T, D) by angle tables that broadcast against (..., T, dims)."""
        rot, rest = x[..., : self.dims], x[..., self.dims:]
        half = self.dims // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """GPT-NeoX's fused QKV output (B, T, 3C), grouped per head, -> q, k, v each (B, H, T, D)."""
    qkv = stack_qkv(qkv, num_heads)
    return qkv[0], qkv[1], qkv[2]


def stack_qkv(qkv: Tensor, num_heads: int) -> Tensor:
    """GPT-NeoX's fused QKV output (B, T, 3C) as one view (3, B, H, T, D): q, k, v."""
    B, T, three_c = qkv.shape
    D = three_c // (3 * num_heads)  # explicit: -1 cannot be inferred when T == 0
    return qkv.view(B, T, num_heads, 3, D).permute(3, 0, 2, 1, 4)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention where q (B, H, T, D) are the last T of the keys k, v (B, H, K, D)."""
    T, K = q.shape[-2], k.shape[-2]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if T == K:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, K, dtype=torch.bool, device=q.device).tril(K - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GrowBuffer:
    """Spare capacity behind a key/value cache, shared by the states that view it.

    A state holds a view ``buf[:, :, :n]``. Appending writes in place when nobody has written
    past ``n`` yet (``filled == n``) and copies otherwise, so older states stay valid and two
    continuations of one state never overwrite each other.
    """

    def __init__(self, k: Tensor, v: Tensor, filled: int) -> None:
        self.k, self.v, self.filled = k, v, filled


def kv_append(k_old: Tensor, v_old: Tensor, spare: GrowBuffer | None, k_new: Tensor,
              v_new: Tensor) -> tuple[Tensor, Tensor, GrowBuffer]:
    """Append (B, H, T, D) keys/values to a cache viewed by k_old/v_old; O(T) when in place."""
    n, t = k_old.shape[-2], k_new.shape[-2]
    can_write = (  # the spare really is the buffer k_old/v_old view, and nobody wrote past n
        spare is not None
        and spare.filled == n
        and spare.k.shape[-2] >= n + t
        and spare.k.shape[:2] == k_new.shape[:2]
        and spare.k.dtype == k_new.dtype == k_old.dtype
        and spare.k.device == k_new.device
        and k_old.data_ptr() == spare.k.data_ptr()
        and v_old.data_ptr() == spare.v.data_ptr()
        and k_old.stride() == spare.k.stride()
        and not torch.is_grad_enabled()
    )
    if not can_write:
        B, H, _, D = k_new.shape
        if torch.is_grad_enabled():  # keep autograd simple: no in-place writes
            k = torch.cat((k_old, k_new), dim=-2)
            v = torch.cat((v_old, v_new), dim=-2)
            return k, v, GrowBuffer(k, v, n + t)
        cap = max(2 * (n + t), 64)
        kb = k_new.new_empty(B, H, cap, D)
        vb = v_new.new_empty(B, H, cap, D)
        kb[:, :, :n] = k_old
        vb[:, :, :n] = v_old
        spare = GrowBuffer(kb, vb, n)
    assert spare is not None
    spare.k[:, :, n:n + t] = k_new
    spare.v[:, :, n:n + t] = v_new
    spare.filled = n + t
    return spare.k[:, :, : n + t], spare.v[:, :, : n + t], spare


class MLP(nn.Module):
    """GPT-NeoX MLP: dense_h_to_4h -> exact GELU -> dense_4h_to_h."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.layer_hidden
        self.dense_h_to_4h = nn.Linear(C, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))
