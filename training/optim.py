"""The optimizer of Phase 2: AdamW parameter groups (memory gates apart), the learning-rate
schedule, and the gate values that are logged.

Gates are the memory layers' ``...attention.gate`` (mix of memory read and local attention),
the hierarchical layer's ``expand_weight``/``expand_bias`` and the optional write gate
(``write_gate``/``write_gate_bias``, `memory_write_gate`). They get their own learning rate and
no weight decay: with the model's rate and decay they stay near sigmoid(0) = 0.5, the known
failure of Infini-attention reproductions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig

GATE_SUFFIXES = ("attention.gate", "attention.expand_weight", "attention.expand_bias",
                 "attention.write_gate", "attention.write_gate_bias")


def is_gate(name: str) -> bool:
    return name.endswith(GATE_SUFFIXES)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices with weight decay; biases/norms/vectors without; gates apart."""
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_gate(name):
            gates.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
        {"name": "gates", "params": gates, "weight_decay": 0.0, "base_lr": cfg.gate_lr},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak rates at ``step`` (0-based): linear warmup (at most half of the
    run), then cosine down to ``min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def gate_values(model: nn.Module) -> dict[str, list[float]]:
    """sigmoid of every memory gate, per layer and head: {"layers.0.gate": [...], ...}."""
    out = {}
    for name, p in model.named_parameters():
        if is_gate(name) and name.endswith("attention.gate"):
            key = name.replace(".attention.gate", ".gate").removeprefix("module.")
            out[key] = [round(v, 4) for v in torch.sigmoid(p.detach().float()).tolist()]
    return out
