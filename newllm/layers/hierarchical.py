"""`hierarchical`: a coarse memory over everything plus fine memories, with a learned expansion
gate deciding per head and token how far to go from the coarse read into the fine ones.

- Coarse: one Infini memory that every segment writes into (the gist of the whole text).
- Fine: ``num_memories`` memories written and read exactly as in `multi_memory` (a segment goes
  to the first empty fine memory, then to the most similar one; reads are attention-weighted).
- Expansion gate per head: e = sigmoid(w_h · q + b_h); A_mem = (1 − e)·A_coarse + e·A_fine.
  Coarse-to-fine retrieval: a query that finds what it needs in the gist stays coarse, one that
  needs detail expands into the fine memory that matches it best.
The memory read is then gated with local attention as in every memory layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from newllm.config import ModelConfig
from newllm.layers.common import merge_heads
from newllm.layers.memory import SegmentMemoryAttention, memory_read
from newllm.layers.multi_memory import fine_shapes, read_many, write_many


@dataclass(frozen=True)
class HierarchicalState:
    coarse: Tensor  # (B, MH, dk, dk)
    coarse_z: Tensor  # (B, MH, dk)
    memory: Tensor  # (B, N, MH, dk, dk) fine memories
    z: Tensor  # (B, N, MH, dk)
    key_sum: Tensor  # (B, N, C)
    count: Tensor  # (B, N)
    open_k: Tensor  # (B, H, o, D)
    open_v: Tensor  # (B, H, o, D)


class HierarchicalMemoryAttention(SegmentMemoryAttention):
    state_class = HierarchicalState

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        self.num_memories = config.num_memories
        self.expand_weight = nn.Parameter(torch.zeros(config.num_heads, config.head_dim))
        self.expand_bias = nn.Parameter(torch.zeros(config.num_heads))

    def memory_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        B, MH, dk = batch_size, self.memory_heads, self.dk
        return {"coarse": (B, MH, dk, dk), "coarse_z": (B, MH, dk),
                **fine_shapes(B, self.num_memories, MH, dk)}

    def read(self, sq: Tensor, q: Tensor, state: HierarchicalState) -> tuple[Tensor, Tensor]:
        coarse = memory_read(sq, state.coarse, state.coarse_z)  # (B, MH, T, dk)
        fine, _ = read_many(sq, merge_heads(q), state.memory, state.z, state.key_sum,
                            state.count)
        w, b = self.expand_weight.to(q.dtype), self.expand_bias.to(q.dtype)
        e = torch.sigmoid(torch.einsum("bhtd,hd->bht", q, w)
                          + b.view(1, -1, 1)).unsqueeze(-1)  # (B, H, T, 1)
        mixed = (1 - e) * self.from_memory_heads(coarse) + e * self.from_memory_heads(fine)
        active = state.coarse_z.flatten(1).sum(dim=1) > 0
        return self.to_memory_heads(mixed), active

    def write(self, sk: Tensor, k: Tensor, v: Tensor, state: HierarchicalState,
              segment: int) -> dict[str, Tensor]:
        coarse, coarse_z = self.write_memory(sk, k, v, state.coarse, state.coarse_z)
        fine = write_many(sk, k, v, state.memory, state.z, state.key_sum, state.count,
                          self.write_memory)
        return {"coarse": coarse, "coarse_z": coarse_z, **fine}
