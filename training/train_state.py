"""Training checkpoints: the model folder plus the trainer's state, without pickle.

A checkpoint is ``<out>/checkpoints/step-0000100/`` holding
- the model checkpoint of the library (``model.safetensors``, ``config.json``,
  ``tokenizer.json``) written by `newllm.checkpoint.save_pretrained`, loadable on its own;
- ``trainer_state.safetensors``: every optimizer state tensor (``optimizer.<param>.<key>``) and
  the torch RNG states (``rng.cpu``, ``rng.cuda``);
- ``trainer_state.json``: step, tokens seen, the optimizer's param groups (plain numbers), the
  run's settings, anything else the trainer adds.

A folder is written under a temporary name and renamed when complete, so a crash mid-save
leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``out``, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                      dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                extra.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "non_tensor_state": extra}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("non_tensor_state", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(folder: str | Path, model: nn.Module, tokenizer: Any,
                             optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> Path:
    """Write model + trainer state to ``folder`` atomically (temp folder, then rename)."""
    from newllm.checkpoint import save_pretrained

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp, tokenizer)
    tensors, opt_meta = optimizer_to_tensors(optimizer)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps({**info, "optimizer": opt_meta}, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def load_training_checkpoint(folder: str | Path, model: nn.Module,
                             optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights, optimizer state and RNG state from ``folder``; return the JSON info."""
    from newllm.checkpoint import from_pretrained

    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_JSON})")
    saved = from_pretrained(folder, device="cpu")
    model.load_state_dict(saved.state_dict())
    info = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / STATE_TENSORS))
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_from_tensors(tensors, info["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return info


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
