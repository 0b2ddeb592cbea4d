"""`multi_memory`: several independent compressive memories, read through attention over them.

There are ``num_memories`` (N) memories, each an Infini memory (M, z per memory head), plus a
routing key per memory: the mean of the raw (pre-feature, position-free) keys it has stored.

- Read: each memory is read as in Infini-attention; a query weights the N reads by a softmax of
  ``q · mean_key_m / sqrt(C)`` over the memories that hold anything.
- Write rule: a finished segment goes to the first empty memory while there is one; after that
  to the memory whose mean key is most similar (cosine) to the segment's mean key. So topics
  that recur share a memory, and a new topic finds the closest one rather than overwriting all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from newllm.config import ModelConfig
from newllm.layers.common import merge_heads
from newllm.layers.memory import SegmentMemoryAttention, memory_read

# a memory layer's write rule: (sk, k, v, M, z) -> (M, z)
WriteFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class MultiMemoryState:
    memory: Tensor  # (B, N, MH, dk, dk)
    z: Tensor  # (B, N, MH, dk)
    key_sum: Tensor  # (B, N, C) sum of raw keys written into each memory
    count: Tensor  # (B, N) tokens written into each memory
    open_k: Tensor  # (B, H, o, D)
    open_v: Tensor  # (B, H, o, D)


def fine_shapes(batch: int, n: int, mh: int, dk: int) -> dict[str, tuple[int, ...]]:
    return {"memory": (batch, n, mh, dk, dk), "z": (batch, n, mh, dk),
            "key_sum": (batch, n, mh * dk), "count": (batch, n)}


def read_many(sq: Tensor, q_full: Tensor, memory: Tensor, z: Tensor, key_sum: Tensor,
              count: Tensor) -> tuple[Tensor, Tensor]:
    """Attention-weighted read of N memories.

    sq (B, MH, T, dk) query features; q_full (B, T, C) raw queries; memory (B, N, MH, dk, dk).
    Returns (B, MH, T, dk) and active (B,).
    """
    reads = memory_read(sq.unsqueeze(1), memory, z)  # (B, N, MH, T, dk)
    filled = count > 0  # (B, N)
    mean_key = key_sum / count.clamp_min(1).unsqueeze(-1)  # (B, N, C)
    scores = q_full @ mean_key.transpose(1, 2) / math.sqrt(q_full.shape[-1])  # (B, T, N)
    scores = scores.masked_fill(~filled.unsqueeze(1), float("-inf"))
    active = filled.any(dim=1)
    weights = torch.softmax(scores.masked_fill(~active.view(-1, 1, 1), 0.0), dim=-1)  # (B,T,N)
    out = torch.einsum("btn,bnhtd->bhtd", weights, reads)
    return out, active


def route(k_mean: Tensor, key_sum: Tensor, count: Tensor) -> Tensor:
    """Which memory each row's segment goes to: first empty one, else the most similar (B,)."""
    empty = count == 0  # (B, N)
    first_empty = torch.argmax(empty.to(torch.int8), dim=1)
    mean_key = key_sum / count.clamp_min(1).unsqueeze(-1)
    sim = F.cosine_similarity(mean_key, k_mean.unsqueeze(1), dim=-1)  # (B, N)
    return torch.where(empty.any(dim=1), first_empty, sim.argmax(dim=1))


def write_many(sk: Tensor, k: Tensor, v: Tensor, memory: Tensor, z: Tensor, key_sum: Tensor,
               count: Tensor, write: WriteFn) -> dict[str, Tensor]:
    """Write one segment into the routed memory of each row. k (B, MH, S, dk) raw keys;
    ``write(sk, k, v, M, z) -> (M, z)``: the layer's rule (its ``write_memory``)."""
    B, N = count.shape
    S = k.shape[-2]
    k_full = k.transpose(1, 2).reshape(B, S, -1)  # (B, S, C)
    target = route(k_full.mean(dim=1).detach(), key_sum, count)  # (B,)
    rows = torch.arange(B, device=k.device)
    M_new, z_new = write(sk, k, v, memory[rows, target], z[rows, target])
    pick = F.one_hot(target, N).to(torch.bool)  # (B, N)
    return {
        "memory": torch.where(pick.view(B, N, 1, 1, 1), M_new.unsqueeze(1), memory),
        "z": torch.where(pick.view(B, N, 1, 1), z_new.unsqueeze(1), z),
        "key_sum": key_sum + pick.unsqueeze(-1).to(k.dtype) * k_full.sum(dim=1).unsqueeze(1),
        "count": count + pick.to(count.dtype) * S,
    }


class MultiMemoryAttention(SegmentMemoryAttention):
    state_class = MultiMemoryState

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        self.num_memories = config.num_memories

    def memory_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        return fine_shapes(batch_size, self.num_memories, self.memory_heads, self.dk)

    def read(self, sq: Tensor, q: Tensor, state: MultiMemoryState) -> tuple[Tensor, Tensor]:
        return read_many(sq, merge_heads(q), state.memory, state.z, state.key_sum, state.count)

    def write(self, sk: Tensor, k: Tensor, v: Tensor, state: MultiMemoryState,
              segment: int) -> dict[str, Tensor]:
        return write_many(sk, k, v, state.memory, state.z, state.key_sum, state.count,
                          self.write_memory)
