"""`infini`: Infini-attention (Munkhdalai et al. 2024) with memory banks.

One compressive memory per memory head (by default a single head over the full layer width), read
with the previous segments' memory and written at the end of each segment (delta rule by
default, or linear). See `newllm.layers.memory` for the equations and the gate.

Memory banks (``num_memory_banks`` = NB > 1): segment s writes into bank
``(s // segments_per_bank) % NB``; when a bank comes round again it is cleared first, so the
memory covers the last (NB − 1)·spb to NB·spb segments. Reads sum over banks (numerators and
normalisers), which with one bank is plain Infini-attention; one bank is never cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from newllm.config import ModelConfig
from newllm.layers.memory import SegmentMemoryAttention, memory_read


@dataclass(frozen=True)
class InfiniState:
    memory: Tensor  # (B, NB, MH, dk, dk)
    z: Tensor  # (B, NB, MH, dk)
    open_k: Tensor  # (B, H, o, D) unrotated keys of the open segment, o < S
    open_v: Tensor  # (B, H, o, D)


class InfiniAttention(SegmentMemoryAttention):
    state_class = InfiniState

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        self.num_banks = config.num_memory_banks
        self.segments_per_bank = config.segments_per_bank

    def memory_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        B, NB, MH, dk = batch_size, self.num_banks, self.memory_heads, self.dk
        return {"memory": (B, NB, MH, dk, dk), "z": (B, NB, MH, dk)}

    def read(self, sq: Tensor, q: Tensor, state: InfiniState) -> tuple[Tensor, Tensor]:
        if self.num_banks == 1:  # a view: no copy of the memory per step
            M, z = state.memory[:, 0], state.z[:, 0]  # (B, MH, dk, dk), (B, MH, dk)
        else:
            M, z = state.memory.sum(dim=1), state.z.sum(dim=1)
        active = z.flatten(1).sum(dim=1) > 0  # (B,)
        return memory_read(sq, M, z), active

    def bank_for(self, segment: int) -> tuple[int, bool]:
        """Which bank segment ``segment`` writes, and whether that bank is cleared first."""
        if self.num_banks == 1:
            return 0, False
        cycle = segment // self.segments_per_bank
        return cycle % self.num_banks, cycle >= self.num_banks and segment % \
            self.segments_per_bank == 0

    def write_group(self, segment: int) -> tuple[int, bool]:
        return self.bank_for(segment)

    def write(self, sk: Tensor, k: Tensor, v: Tensor, state: InfiniState,
              segment: int) -> dict[str, Tensor]:
        b, clear = self.bank_for(segment)
        M, z = state.memory[:, b], state.z[:, b]
        if clear:
            M, z = torch.zeros_like(M), torch.zeros_like(z)
        M, z = self.write_memory(sk, k, v, M, z)
        if self.num_banks == 1:
            return {"memory": M.unsqueeze(1), "z": z.unsqueeze(1)}
        memory = torch.cat((state.memory[:, :b], M.unsqueeze(1), state.memory[:, b + 1:]), 1)
        zs = torch.cat((state.z[:, :b], z.unsqueeze(1), state.z[:, b + 1:]), 1)
        return {"memory": memory, "z": zs}
