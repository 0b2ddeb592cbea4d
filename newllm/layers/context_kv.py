"""`context_kv`: attention whose KV cache is one compressed context per chunk of tokens.

The context block (see `newllm.context`) turns every token into a context vector. This layer's
queries come from the token stream; its keys and values are projections of context vectors: the
contexts at the ends of all *finished* chunks of ``chunk_size`` tokens before the token, plus the
token's own current context. A token at position 350 with chunks of 100 attends to the contexts
at positions 99, 199, 299 and its own (4 vectors). The cache grows by one key/value pair per
``chunk_size`` tokens instead of one per token. No position encoding: the recurrent contexts
carry order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from newllm.config import ModelConfig
from newllm.layers.common import GrowBuffer, KVSlots, SlotStep, Step, kv_append, merge_heads


@dataclass(frozen=True)
class ContextKVState:
    k: Tensor  # (B, H, P // chunk, D) keys of finished chunks' last contexts
    v: Tensor  # (B, H, P // chunk, D)
    _spare: GrowBuffer | None = field(default=None, compare=False, repr=False)


def visible_contexts(position: int, chunk_size: int) -> int:
    """How many context vectors the token at ``position`` attends to."""
    return position // chunk_size + 1


class ContextKVAttention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        C = config.layer_hidden
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.chunk = config.chunk_size
        self.query = nn.Linear(C, C)
        self.key_value = nn.Linear(config.context_dim, 2 * C)
        self.dense = nn.Linear(C, C)

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> ContextKVState:
        z = torch.zeros(batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype)
        return ContextKVState(z, z.clone())

    def state_shapes(self, batch_size: int, position: int) -> dict[str, tuple[int, ...]]:
        shape = (batch_size, self.num_heads, position // self.chunk, self.head_dim)
        return {"k": shape, "v": shape}

    def forward(self, x: Tensor, state: ContextKVState, step: Step) -> tuple[Tensor, Any]:
        assert step.contexts is not None, "context_kv needs the context block's contexts"
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.query(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        kv = self.key_value(step.contexts).view(B, T, H, 2, D).permute(3, 0, 2, 1, 4)
        k_own, v_own = kv[0], kv[1]  # (B, H, T, D)
        pos = torch.arange(step.position, step.position + T, device=x.device)  # (T,)
        ends = ((pos + 1) % self.chunk == 0).nonzero().squeeze(-1)  # new chunk ends
        n_old = state.k.shape[-2]
        k_all, v_all, spare = kv_append(state.k, state.v, state._spare, k_own[:, :, ends],
                                        v_own[:, :, ends])  # (B, H, J, D)
        end_pos = torch.arange(1, k_all.shape[-2] + 1, device=x.device) * self.chunk - 1  # (J,)
        scale = 1.0 / math.sqrt(D)
        s_chunks = (q @ k_all.transpose(-1, -2)) * scale  # (B, H, T, J)
        s_chunks = s_chunks.masked_fill(end_pos.view(1, -1) >= pos.view(-1, 1), float("-inf"))
        s_own = (q * k_own).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
        w = torch.softmax(torch.cat((s_chunks, s_own), dim=-1).float(), dim=-1).to(q.dtype)
        out = w[..., :-1] @ v_all + w[..., -1:] * v_own  # (B, H, T, D)
        assert k_all.shape[-2] == n_old + ends.numel()
        return self.dense(merge_heads(out)), ContextKVState(k_all, v_all, spare)

    # slots (see newllm.slots): one padded buffer of chunk-end keys/values per slot ----------
    def slot_init(self, slots: int, device: Any, dtype: torch.dtype) -> KVSlots:
        return KVSlots.zeros(slots, self.num_heads, 16, self.head_dim, device, dtype)

    def slot_load(self, buf: KVSlots, row: int, state: ContextKVState, position: int) -> None:
        buf.load(row, state.k, state.v)

    def slot_extract(self, buf: KVSlots, row: int, position: int) -> ContextKVState:
        return ContextKVState(*buf.extract(row, position // self.chunk))

    def slot_reserve(self, buf: KVSlots, step: SlotStep) -> None:
        """Room in the buffers for the step's reads and writes (before a ``fixed`` step)."""
        buf.reserve(max(p // self.chunk for p in step.host_position) + 1)

    def slot_step(self, x: Tensor, buf: KVSlots, step: SlotStep) -> Tensor:
        """One token per row: x (N, 1, C) -> (N, 1, C); a row that ends a chunk stores it."""
        assert step.contexts is not None, "context_kv needs the context block's contexts"
        N, H, D = x.shape[0], self.num_heads, self.head_dim
        q = self.query(x).view(N, 1, H, D).transpose(1, 2)  # (N, H, 1, D)
        kv = self.key_value(step.contexts).view(N, 1, H, 2, D).permute(3, 0, 2, 1, 4)
        k_own, v_own = kv[0], kv[1]  # (N, H, 1, D)
        chunks = step.position // self.chunk  # (N,) finished chunks before each row's token
        if step.fixed:  # the whole buffer, masked (reserved by slot_reserve)
            width = buf.k.shape[2]
        else:
            width = max(p // self.chunk for p in step.host_position)
            buf.reserve(width + 1)
        keys, values = step.take(buf.k)[:, :, :width], step.take(buf.v)[:, :, :width]
        scale = 1.0 / math.sqrt(D)
        s_chunks = (q @ keys.transpose(-1, -2)) * scale  # (N, H, 1, J)
        hidden = torch.arange(width, device=x.device).view(1, -1) >= chunks.view(-1, 1)  # (N, J)
        s_chunks = s_chunks.masked_fill(hidden.view(N, 1, 1, width), float("-inf"))
        s_own = (q * k_own).sum(-1, keepdim=True) * scale  # (N, H, 1, 1)
        w = torch.softmax(torch.cat((s_chunks, s_own), dim=-1).float(), dim=-1).to(q.dtype)
        out = w[..., :-1] @ values + w[..., -1:] * v_own  # (N, H, 1, D)
        if step.fixed:  # every row writes its own key/value at index ``chunks``: hidden until
            # the chunk is finished, and then it holds the chunk's last token's (no host branch)
            buf.k[step.rows, :, chunks] = k_own[:, :, 0]
            buf.v[step.rows, :, chunks] = v_own[:, :, 0]
            return self.dense(merge_heads(out))
        ends = step.ending(self.chunk)
        if ends:  # these rows finish a chunk: their own context becomes its key/value
            e = torch.tensor(ends, device=x.device)
            buf.k[step.rows[e], :, chunks[e]] = k_own[e, :, 0]
            buf.v[step.rows[e], :, chunks[e]] = v_own[e, :, 0]
        return self.dense(merge_heads(out))
