"""newllm: compressed-memory language models with explicit, portable memory state."""

from __future__ import annotations

from typing import Any

from newllm.config import PRESETS, ModelConfig, config_for
from newllm.model import TransformerLM
from newllm.state import ModelState

__version__ = "0.1.0"


def create_model(kind: str, size: str = "70m", **options: Any) -> TransformerLM:
    """A fresh model of one of the seeds' kinds: ``create_model("infini", num_memory_banks=2)``.

    ``kind`` is one of pythia, infini, multi_memory, hierarchical, context_pythia, context_kv;
    ``size`` picks the preset family (``70m``, ``tiny``, ``small``); ``options`` override any
    `ModelConfig` field (use_delta_rule, num_memories, segment_len, chunk_size, context_dim, ...).
    """
    return TransformerLM(config_for(kind, size, **options))


__all__ = ["PRESETS", "ModelConfig", "ModelState", "TransformerLM", "config_for", "create_model"]
