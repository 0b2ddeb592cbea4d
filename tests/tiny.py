"""Tiny models for tests: `make` builds a preset with fixed seed and open memory gates."""

from __future__ import annotations

import torch

from newllm import ModelConfig, TransformerLM


def make(name: str, seed: int = 0, **overrides: object) -> TransformerLM:
    """A tiny model whose memory gates (and expansion biases) are random in (-1, 1), not 0, so
    every path of the state contributes to the logits."""
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig.from_name(name, **overrides)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("attention.gate", "expand_bias")):
                p.uniform_(-1.0, 1.0)
    return model
