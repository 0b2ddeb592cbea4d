"""Pieces shared by the token mixers: the per-call `Step`, rotary embeddings, the GPT-NeoX QKV
split, causal attention with an offset, and a growable key/value buffer with value semantics.

Shape letters: B batch, T new tokens, H heads, D head dim, C layer width, S segment length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.config import ModelConfig


@dataclass(frozen=True)
class Step:
    """What every mixer is told about the current forward call."""

    position: int  # absolute position of the first new token
    contexts: Tensor | None = None  # (B, T, context_dim) context vectors (context models)


# Angle tables are a pure function of (dims, base, start, length, device), so every layer and
# every model shares one small cache: a decode step at position p computes its table once, not
# once per layer. Only short tables (decode steps, short chunks) are kept.
_ANGLES_CACHED_UP_TO = 256


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
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
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
