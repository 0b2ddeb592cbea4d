"""Closed-form session-state sizes: what a state holds after P tokens, per layer type.

With C the layer width, S the segment length, MH memory heads, dk = C / MH, N memories,
NB banks and B the batch size, the number of values a layer keeps is:

=============  ==============================================================
pythia         2·C·P   (keys and values of every token; 2·C·(P mod S) when segment_local)
infini         NB·MH·(dk² + dk) + 2·C·(P mod S)   (memories + open segment)
multi_memory   N·(MH·(dk² + dk) + C + 1) + 2·C·(P mod S)
hierarchical   MH·(dk² + dk) + N·(MH·(dk² + dk) + C + 1) + 2·C·(P mod S)
context_kv     2·C·⌊P / chunk_size⌋               (one key/value per finished chunk)
=============  ==============================================================

plus ``context_dim`` for the context block's last context in context models; all times B.
Memory kinds are constant in P except for the bounded open segment (< S tokens); Pythia grows
linearly; Context-Pythia is Pythia at width ``context_dim``.
"""

from __future__ import annotations

from newllm.config import ModelConfig


def layer_state_values(config: ModelConfig, kind: str, position: int) -> int:
    """Values (not bytes) one layer of type ``kind`` keeps after ``position`` tokens (B = 1)."""
    C, S = config.layer_hidden, config.segment_len
    MH = config.memory_heads
    dk = C // MH
    one_memory = MH * (dk * dk + dk)
    open_segment = 2 * C * (position % S)
    fine = config.num_memories * (one_memory + C + 1)
    formulas = {
        "pythia": 2 * C * (position % S if config.segment_local else position),
        "infini": config.num_memory_banks * one_memory + open_segment,
        "multi_memory": fine + open_segment,
        "hierarchical": one_memory + fine + open_segment,
        "context_kv": 2 * C * (position // config.chunk_size),
    }
    if kind not in formulas:
        raise ValueError(f"no size formula for layer type {kind!r}; known: {sorted(formulas)}")
    return formulas[kind]


def state_values(config: ModelConfig, position: int, batch_size: int = 1) -> int:
    """Values in a whole model state after ``position`` tokens."""
    total = sum(layer_state_values(config, kind, position) for kind in config.layers)
    if config.has_context_block:
        total += config.context_dim
    return batch_size * total


def state_bytes(config: ModelConfig, position: int, batch_size: int = 1,
                bytes_per_value: int = 4) -> int:
    """Bytes of a state after ``position`` tokens (4 per value in fp32, 2 in fp16/bf16)."""
    return state_values(config, position, batch_size) * bytes_per_value


def worst_position(config: ModelConfig, position: int) -> int:
    """The last position of the segment ``position`` is in, where the open segment is full
    and the state is largest. A memory layer's state swings by up to 2·C·S values between
    segment boundaries, so sizes at multiples of S are the best case; this is the worst case
    around ``position`` (for kinds that only grow, the size S - 1 tokens later at most)."""
    S = config.segment_len
    return position + (S - 1 - position % S)


def worst_state_bytes(config: ModelConfig, position: int, batch_size: int = 1,
                      bytes_per_value: int = 4) -> int:
    """`state_bytes` at `worst_position`: at most this much anywhere near ``position``."""
    return state_bytes(config, worst_position(config, position), batch_size, bytes_per_value)


def pythia_of_shape(config: ModelConfig) -> ModelConfig:
    """``config``'s shape with every layer a full-attention Pythia layer (no memory, no context
    block): the baseline whose KV cache a memory model is compared with."""
    data = {**config.to_dict(), "name": f"{config.name}-as-pythia",
            "layers": ["pythia"] * config.num_layers, "segment_local": False,
            "context_mode": "none"}
    return ModelConfig.from_dict(data)


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 4) -> int:
    """Bytes a same-shape Pythia's KV cache grows by per token: 2 (K and V) × layers × hidden
    × ``bytes_per_value``."""
    return state_bytes(pythia_of_shape(config), 1, bytes_per_value=bytes_per_value)
