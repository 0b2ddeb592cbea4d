"""The layer registry: layer type name -> token mixer class.

Adding a layer type is one file in this package, one line here and one test parameter. Every
mixer has the same interface:

- ``__init__(config, index)``
- ``init_state(batch_size, device, dtype) -> state`` (a frozen dataclass of tensors)
- ``state_shapes(batch_size, position) -> {field: shape}`` (what a state must look like after
  ``position`` tokens; memory files are checked against it)
- ``forward(x, state, step) -> (y, new_state)`` with x, y (B, T, C) and ``step`` a `Step`.
"""

from __future__ import annotations

from newllm.layers.context_kv import ContextKVAttention
from newllm.layers.hierarchical import HierarchicalMemoryAttention
from newllm.layers.infini import InfiniAttention
from newllm.layers.multi_memory import MultiMemoryAttention
from newllm.layers.pythia import PythiaAttention

LAYERS: dict[str, type] = {
    "pythia": PythiaAttention,
    "infini": InfiniAttention,
    "multi_memory": MultiMemoryAttention,
    "hierarchical": HierarchicalMemoryAttention,
    "context_kv": ContextKVAttention,
}
