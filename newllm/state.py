"""Explicit model state: everything a model needs to continue a text, as plain values.

`model(input_ids, state) -> (logits, new_state)`. A `ModelState` holds the position (tokens
seen), one frozen dataclass per layer (its KV cache, memory matrices, open segment, ...), and the
context block's last context. States are values: a forward pass never changes the state it was
given, so a state can be kept, branched, saved and restored.

Every per-layer state is a frozen dataclass whose public fields are tensors with a leading batch
dimension; fields whose names start with ``_`` are private helpers (e.g. spare buffer capacity)
and are never saved. Field shapes are a pure function of (config, batch size, position), which is
what lets a memory file be checked tensor by tensor before it is trusted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def state_tensors(layer_state: Any) -> dict[str, Tensor]:
    """The public tensor fields of one layer state, by field name."""
    return {
        f.name: getattr(layer_state, f.name)
        for f in dataclasses.fields(layer_state)
        if not f.name.startswith("_")
    }


@dataclass(frozen=True)
class ModelState:
    """The whole state of a `TransformerLM` after ``position`` tokens (per batch row)."""

    position: int
    layers: tuple[Any, ...]
    context: Tensor | None = None  # (B, context_dim) last context of the context block
    pointer: Any = None  # `newllm.pointer.PointerState` of a model with a pointer cache

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.flat_tensors().values())).shape[0])

    def flat_tensors(self) -> dict[str, Tensor]:
        """Flat names (``layers.3.memory``, ``context.last``) -> tensors, in a stable order."""
        out: dict[str, Tensor] = {}
        for i, layer_state in enumerate(self.layers):
            for name, t in state_tensors(layer_state).items():
                out[f"layers.{i}.{name}"] = t
        if self.context is not None:
            out["context.last"] = self.context
        if self.pointer is not None:
            for name, t in state_tensors(self.pointer).items():
                out[f"pointer.{name}"] = t
        return out

    def nbytes(self) -> int:
        """Bytes of the state's tensors: what a memory file carries (besides its header)."""
        return sum(t.numel() * t.element_size() for t in self.flat_tensors().values())

    def resident_bytes(self) -> int:
        """Bytes a live session holds: the storages behind the tensors, spare capacity included."""
        storages: dict[int, int] = {}
        for t in self.flat_tensors().values():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> ModelState:
        def move(ls: Any) -> Any:
            return dataclasses.replace(
                ls, **{k: v.to(device=device, dtype=dtype) for k, v in state_tensors(ls).items()}
            )
        ctx = None if self.context is None else self.context.to(device=device, dtype=dtype)
        pointer = None if self.pointer is None else move(self.pointer)
        return ModelState(self.position, tuple(move(ls) for ls in self.layers), ctx, pointer)

    def detach(self) -> ModelState:
        """The same state cut from the autograd graph (truncated backprop between segments)."""
        def cut(ls: Any) -> Any:
            return dataclasses.replace(ls, **{k: v.detach() for k, v in state_tensors(ls).items()})
        ctx = None if self.context is None else self.context.detach()
        pointer = None if self.pointer is None else cut(self.pointer)
        return ModelState(self.position, tuple(cut(ls) for ls in self.layers), ctx, pointer)
