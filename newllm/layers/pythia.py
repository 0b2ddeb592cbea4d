"""`pythia`: GPT-NeoX attention as transformers implements it, with an explicit KV cache.

Per-head fused QKV (``W.view(H, 3, D, C)``), rotary on the first ``rotary_pct`` of each head at
absolute positions, softmax attention over every earlier token. The state is the KV cache (keys
after rotation), which grows by one entry per token: 2 * C values per token per layer.

With ``attention_key_shift`` the attention reads each cached key plus the previous cached key
times a learned per-channel weight (``local_key_shift``, (H, 1, D)); the cache itself keeps the
plain keys, and it starts where the attended span starts (position 0, or the segment's first
token with ``segment_local``), so the first key of the span has no predecessor in any path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from newllm.config import ModelConfig
from newllm.layers.common import (
    GrowBuffer,
    KVSlots,
    Rotary,
    SlotStep,
    Step,
    causal_attention,
    kv_append,
    length_mask,
    merge_heads,
    slot_attention,
    stack_qkv,
)


@dataclass(frozen=True)
class KVState:
    k: Tensor  # (B, H, T, D) rotated keys of every token so far
    v: Tensor  # (B, H, T, D)
    _spare: GrowBuffer | None = field(default=None, compare=False, repr=False)


class PythiaAttention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        C = config.layer_hidden
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(C, 3 * C)
        self.dense = nn.Linear(C, C)
        self.rotary = Rotary(config)
        self.window = config.segment_len if config.segment_local else 0
        self.shift_keys = config.attention_key_shift
        if self.shift_keys:
            self.local_key_shift = nn.Parameter(torch.zeros(config.num_heads, 1, config.head_dim))

    def shifted_keys(self, k: Tensor) -> Tensor:
        """Keys (..., H, T, D) of a span from its first token, as the attention reads them: each
        plus the previous one times ``local_key_shift`` (the plain keys without the option)."""
        if not self.shift_keys:
            return k
        prev = torch.cat([torch.zeros_like(k[..., :1, :]), k[..., :-1, :]], dim=-2)
        return k + self.local_key_shift.to(k.dtype) * prev

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> KVState:
        z = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVState(z, z.clone())

    def state_shapes(self, batch_size: int, position: int) -> dict[str, tuple[int, ...]]:
        kept = position % self.window if self.window else position
        shape = (batch_size, self.num_heads, kept, self.head_dim)
        return {"k": shape, "v": shape}

    def forward(self, x: Tensor, state: KVState, step: Step) -> tuple[Tensor, KVState]:
        qkv = stack_qkv(self.query_key_value(x), self.num_heads)  # (3, B, H, T, D)
        qk = self.rotary(qkv[:2], step.position)  # q and k rotated in one go
        q, k, v = qk[0], qk[1], qkv[2]  # (B, H, T, D) each
        if not self.window:
            k_all, v_all, spare = kv_append(state.k, state.v, state._spare, k, v)
            out = causal_attention(q, self.shifted_keys(k_all), v_all)  # (B, H, T, D)
            return self.dense(merge_heads(out)), KVState(k_all, v_all, spare)
        outs, pos, start, T = [], step.position, 0, x.shape[1]
        while start < T:  # segment by segment
            n = min(self.window - pos % self.window, T - start)
            k_all, v_all, spare = kv_append(state.k, state.v, state._spare,
                                            k[:, :, start:start + n], v[:, :, start:start + n])
            outs.append(causal_attention(q[:, :, start:start + n], self.shifted_keys(k_all),
                                         v_all))
            state = KVState(k_all, v_all, spare)
            if (pos + n) % self.window == 0:
                state = KVState(k_all[:, :, :0], v_all[:, :, :0])
            pos, start = pos + n, start + n
        if not outs:
            return torch.zeros_like(x), state
        return self.dense(merge_heads(torch.cat(outs, dim=-2))), state

    # slots (see newllm.slots): a padded KV buffer per slot, its length given by the position -
    def kept(self, position: int) -> int:
        """KV entries a state holds after ``position`` tokens."""
        return position % self.window if self.window else position

    def slot_init(self, slots: int, device: Any, dtype: torch.dtype) -> KVSlots:
        cap = self.window or 64
        return KVSlots.zeros(slots, self.num_heads, cap, self.head_dim, device, dtype)

    def slot_load(self, buf: KVSlots, row: int, state: KVState, position: int) -> None:
        buf.load(row, state.k, state.v)

    def slot_extract(self, buf: KVSlots, row: int, position: int) -> KVState:
        return KVState(*buf.extract(row, self.kept(position)))

    def slot_reserve(self, buf: KVSlots, step: SlotStep) -> None:
        """Room in the buffers for the step's writes (before a ``fixed`` step)."""
        buf.reserve(max(self.kept(p) for p in step.host_position) + 1)

    def slot_step(self, x: Tensor, buf: KVSlots, step: SlotStep) -> Tensor:
        """One token per row: x (N, 1, C) -> (N, 1, C); the rows' keys/values join their slots."""
        qkv = stack_qkv(self.query_key_value(x), self.num_heads)  # (3, N, H, 1, D)
        q, k = step.rotate(self.rotary, qkv[0]), step.rotate(self.rotary, qkv[1])
        if step.fixed:  # the whole buffer, masked (reserved by slot_reserve)
            width = buf.k.shape[2]
        else:
            width = max(self.kept(p) for p in step.host_position) + 1  # longest row after it
            buf.reserve(width)
        kept = step.position % self.window if self.window else step.position  # (N,)
        buf.k[step.rows, :, kept] = k[:, :, 0]
        buf.v[step.rows, :, kept] = qkv[2][:, :, 0]
        keys, values = step.take(buf.k)[:, :, :width], step.take(buf.v)[:, :, :width]
        out = slot_attention(q, self.shifted_keys(keys), values, length_mask(kept + 1, width),
                             step.fixed)
        return self.dense(merge_heads(out))  # (N, 1, C)
