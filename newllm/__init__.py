"""newllm: compressed-memory language models with explicit, portable memory state."""

from __future__ import annotations

from typing import Any

from newllm.checkpoint import from_hf, from_pretrained, load_checkpoint, save_pretrained
from newllm.config import PRESETS, ModelConfig, config_for
from newllm.generation import SamplingParams, generate, generate_batch, score
from newllm.memory_file import MemoryFileError, load_memory, read_memory_metadata, save_memory
from newllm.model import TransformerLM
from newllm.session import Session
from newllm.state import ModelState
from newllm.tokenizer import Tokenizer

__version__ = "0.1.0"


def create_model(kind: str, size: str = "70m", **options: Any) -> TransformerLM:
    """A fresh model of one of the seeds' kinds: ``create_model("infini", num_memory_banks=2)``.

    ``kind`` is one of pythia, infini, multi_memory, hierarchical, context_pythia, context_kv;
    ``size`` picks the preset family (``70m``, ``tiny``, ``small``); ``options`` override any
    `ModelConfig` field (use_delta_rule, num_memories, segment_len, chunk_size, context_dim, ...).
    """
    return TransformerLM(config_for(kind, size, **options))


__all__ = [
    "PRESETS", "MemoryFileError", "ModelConfig", "ModelState", "SamplingParams", "Session",
    "Tokenizer", "TransformerLM", "config_for", "create_model", "from_hf", "from_pretrained",
    "generate", "generate_batch", "load_checkpoint", "load_memory", "read_memory_metadata",
    "save_memory", "save_pretrained", "score",
]
