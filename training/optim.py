"""The optimizer of Phase 2: AdamW parameter groups (memory gates apart), the learning-rate
schedule, and the gate values that are logged.

Gates are the memory layers' ``...attention.gate`` (mix of memory read and local attention),
the hierarchical layer's ``expand_weight``/``expand_bias`` and the optional write gate
(``write_gate``/``write_gate_bias``, `memory_write_gate`). They get their own learning rate and
no weight decay: with the model's rate and decay they stay near sigmoid(0) = 0.5, the known
failure of Infini-attention reproductions.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig, lr_factor_item

GATE_SUFFIXES = ("attention.gate", "attention.expand_weight", "attention.expand_bias",
                 "attention.write_gate", "attention.write_gate_bias")


def is_gate(name: str) -> bool:
    return name.endswith(GATE_SUFFIXES)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices with weight decay; biases/norms/vectors without; gates apart.
    Parameters that an --lr-factor item matches go to groups of their own ("decay x0.2"),
    their rate multiplied (the first matching item wins); an item that sets no trainable
    parameter is an error."""
    factors = [lr_factor_item(item) for item in cfg.lr_factor]
    used = [False] * len(factors)
    grouped: dict[tuple[str, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "gates" if is_gate(name) else "decay" if p.dim() >= 2 else "no_decay"
        factor = 1.0
        for i, (pattern, f) in enumerate(factors):
            if fnmatch.fnmatchcase(name.removeprefix("module."), pattern):
                factor, used[i] = f, True
                break
        grouped.setdefault((kind, factor), []).append(p)
    for (pattern, _), hit in zip(factors, used, strict=True):
        if not hit:
            raise ValueError(f"--lr-factor {pattern!r} matches no trainable parameter that an "
                             "earlier item does not already set (`newllm info --parameters` "
                             "lists the names)")
    order = {"decay": 0, "no_decay": 1, "gates": 2}
    groups = []
    for (kind, factor), params in sorted(grouped.items(), key=lambda kv: (order[kv[0][0]],
                                                                           -kv[0][1])):
        base = (cfg.gate_lr if kind == "gates" else cfg.lr) * factor
        groups.append({"name": kind if factor == 1.0 else f"{kind} x{factor:g}",
                       "params": params, "base_lr": base, "lr_factor": factor,
                       "weight_decay": cfg.weight_decay if kind == "decay" else 0.0})
    return groups


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
