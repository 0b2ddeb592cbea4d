"""Checkpoints: save and load models as folders, import GPT-NeoX (Pythia) weights from transformers.

A newllm checkpoint is a folder with three files:

- ``config.json``: the `ModelConfig` (`ModelConfig.to_json`); unknown keys are refused.
- ``model.safetensors``: every weight under its module name (``embed_in.weight``,
  ``layers.0.attention.query_key_value.weight``, ...). With tied embeddings ``embed_out.weight``
  is left out and re-tied on load. No pickle anywhere.
- ``tokenizer.json``: the tokenizer (`newllm.tokenizer.Tokenizer`).

`load_checkpoint(spec)` is the one entry point the CLI and the server use. ``spec`` may be:

- ``None``: the bundled default checkpoint, ``newllm/checkpoints/default/`` inside the package.
  When that folder has no ``config.json`` (a fresh clone, before training wrote the bundle), the
  fallback is preset ``tiny-infini`` with seed 0 and the byte-level tokenizer: an untrained model
  that is fast and deterministic, so serving and tests work without any download.
- a folder of ours (``config.json`` with `ModelConfig` keys);
- a transformers GPT-NeoX folder (``config.json`` with ``"model_type": "gpt_neox"``), imported
  with `from_hf`;
- a preset name (``tiny-pythia``, ``infini-70m``, ...): a fresh model with seed 0 and the
  byte-level tokenizer;
- anything else shaped like ``owner/name``: a Hugging Face hub id, downloaded (config, safetensors
  weights and tokenizer.json only) and imported with `from_hf`. Offline this fails at once with
  a clear error.

Models come back in eval mode. With ``dtype=None`` weights keep the dtype they were stored in.
Loading never touches the global random number generator.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from newllm.config import PRESETS, ModelConfig
from newllm.model import TransformerLM, checkpoint_fingerprint
from newllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT: Path = Path(__file__).resolve().parent / "checkpoints" / "default"
FALLBACK_PRESET = "tiny-infini"
FALLBACK_SEED = 0
FORMAT_VERSION = "1"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
Dtype = torch.dtype | str | None


class CheckpointError(ValueError):
    """A checkpoint folder exists but cannot be loaded as asked (bad config, weights, format)."""


def resolve_dtype(dtype: Dtype) -> torch.dtype | None:
    """``torch.bfloat16`` or a name (``"bf16"``, ``"float16"``, ...) -> torch dtype; None stays."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[key]


# saving ------------------------------------------------------------------------------------
def save_pretrained(model: TransformerLM, folder: str | Path, tokenizer: Tokenizer | None = None,
                    *, dtype: Dtype = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (if given) ``tokenizer.json`` to ``folder``.

    ``dtype`` (e.g. ``torch.bfloat16``) casts the floating-point weights as they are written; the
    model itself is not changed. Each file is written to a temporary name and renamed, so a crash
    mid-save leaves the previous file in place. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    target = resolve_dtype(dtype)
    if tokenizer is not None:
        check_tokenizer(config, tokenizer)
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "embed_out.weight":
            continue  # the same tensor as embed_in.weight; re-tied on load
        t = t.detach()
        if target is not None and t.is_floating_point():
            t = t.to(target)
        tensors[name] = t.contiguous().cpu()
    stored = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    metadata = {"format": "pt", "newllm_format": FORMAT_VERSION, "dtype": stored}
    _atomic_write(folder / "model.safetensors",
                  lambda p: save_file(tensors, str(p), metadata=metadata))
    _atomic_write(folder / "config.json", lambda p: p.write_text(config.to_json() + "\n"))
    if tokenizer is not None:
        _atomic_write(folder / "tokenizer.json", tokenizer.save)
        for name, doc in tokenizer_side_files(tokenizer, config).items():
            text = json.dumps(doc, indent=2) + "\n"
            _atomic_write(folder / name, lambda p, text=text: p.write_text(text))
    return folder


def tokenizer_side_files(tokenizer: Tokenizer, config: Any) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``tokenizer``: what
    transformers' ``AutoTokenizer`` reads to know the end-of-text token (used as BOS, EOS and
    padding, as in GPT-NeoX). Without them it finds no EOS, and tools built on it (lm-eval's
    ``local-completions``) send a null token where the prefix token belongs."""
    eos = tokenizer.backend.id_to_token(tokenizer.eos_token_id)
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", **special,
            "model_max_length": int(getattr(config, "max_position_embeddings", 2048)),
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": special,
    }


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a unique temporary file in the same folder, then rename over ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# loading ours ------------------------------------------------------------------------------
def from_pretrained(folder: str | Path, *, device: torch.device | str | None = None,
                    dtype: Dtype = None) -> TransformerLM:
    """Load the model of a checkpoint folder (ours, or a transformers GPT-NeoX folder)."""
    folder = Path(folder)
    data = _read_config(folder)
    if "model_type" in data:
        return _hf_model(folder, data, device=device, dtype=dtype)
    try:
        config = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from exc
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has a config.json but no model.safetensors; a checkpoint folder is written "
            "by newllm.checkpoint.save_pretrained"
        )
    return build_model(config, load_file(str(weights)), device=device, dtype=dtype,
                       source=str(weights))


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; a checkpoint is a folder with config.json, "
            "model.safetensors and tokenizer.json (see newllm.checkpoint.save_pretrained)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def build_model(config: ModelConfig, tensors: dict[str, Tensor], *,
                device: torch.device | str | None = None, dtype: Dtype = None,
                source: str = "weights") -> TransformerLM:
    """A `TransformerLM` of ``config`` holding exactly ``tensors`` (names as in its state_dict).

    Every weight must be present with the right shape and nothing else may be; errors name the
    tensors. The model is built under a forked RNG, so the global RNG is left as it was (built
    for real rather than on the meta device: mixers may keep plain tensors computed at init).
    ``dtype=None`` keeps the tensors' dtype (that of ``embed_in.weight`` for all of them).
    """
    with torch.random.fork_rng(devices=[]):
        model = TransformerLM(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    tensors = dict(tensors)
    if config.tie_word_embeddings:
        tensors.pop("embed_out.weight", None)
        if "embed_in.weight" in tensors:
            tensors["embed_out.weight"] = tensors["embed_in.weight"]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the config: missing {_short(missing)}, "
            f"unexpected {_short(unexpected)}"
        )
    wrong = [f"{n} {tuple(tensors[n].shape)} (config wants {s})"
             for n, s in expected.items() if tuple(tensors[n].shape) != s]
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape: {_short(wrong)}")
    model.to(dtype=resolve_dtype(dtype) or tensors["embed_in.weight"].dtype)
    model.load_state_dict(tensors, strict=True)
    # which checkpoint this is, from the tensors as stored (memory files carry it, so a state
    # moves between copies of this checkpoint served at other precisions)
    model.remember_checkpoint(checkpoint_fingerprint(config, {n: tensors[n] for n in expected}))
    if device is not None:
        model.to(device)
    return model.eval()


def _short(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tokenizer(config: ModelConfig, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer that does not fit the model (larger vocabulary, other EOS id)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
            "use a model config with vocab_size >= the tokenizer's"
        )
    if tokenizer.eos_token_id != config.eos_token_id:
        raise CheckpointError(
            f"tokenizer's EOS id is {tokenizer.eos_token_id} but the model config says "
            f"{config.eos_token_id}; set eos_token_id in the model config to match"
        )


# transformers GPT-NeoX import ----------------------------------------------------------------
# Buffers that old GPT-NeoX checkpoints stored beside the weights (causal mask, rotary table).
_HF_BUFFERS = re.compile(r"(^|\.)attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"]


def hf_config_to_model_config(data: dict[str, Any], name: str = "gpt-neox") -> ModelConfig:
    """A transformers ``GPTNeoXConfig`` (as the dict in its config.json) -> `ModelConfig`.

    Reads both the transformers 5.x keys (``rope_parameters``) and the old ones (``rotary_pct``,
    ``rotary_emb_base``). Refuses what the ``pythia`` layer does not implement: attention without
    bias, an activation other than exact GELU, rotary scaling.
    """
    if "model_type" not in data:
        raise CheckpointError(
            "config.json has no model_type: not a transformers checkpoint; load newllm "
            "checkpoints with from_pretrained or load_checkpoint"
        )
    if data["model_type"] != "gpt_neox":
        raise CheckpointError(
            f"model_type {data['model_type']!r} is not supported; only transformers "
            "GPT-NeoX checkpoints ('gpt_neox', e.g. EleutherAI/pythia-*) can be imported"
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        if key not in data:
            raise CheckpointError(f"GPT-NeoX config.json lacks {key!r}")
    if data.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"hidden_act {data['hidden_act']!r} is not supported; the pythia layer uses exact "
            "GELU ('gelu')"
        )
    if not data.get("attention_bias", True):
        raise CheckpointError(
            "attention_bias=False is not supported; the pythia layer's attention has biases"
        )
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported; only plain rotary embeddings ('default')"
        )
    if data.get("head_dim") not in (None, data["hidden_size"] // data["num_attention_heads"]):
        raise CheckpointError(f"head_dim {data['head_dim']} != hidden_size / num_attention_heads")
    eos = data.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    try:
        return ModelConfig(
            name=name,
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data["hidden_size"]),
            layers=("pythia",) * int(data["num_hidden_layers"]),
            num_heads=int(data["num_attention_heads"]),
            intermediate_size=int(data["intermediate_size"]),
            rotary_pct=float(rope.get("partial_rotary_factor", data.get("rotary_pct", 0.25))),
            rotary_base=float(rope.get("rope_theta", data.get("rotary_emb_base", 10000.0))),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(data.get("use_parallel_residual", True)),
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            eos_token_id=0 if eos is None else int(eos),
            init_std=float(data.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot import this GPT-NeoX config: {exc}") from exc


def hf_weight_name(name: str) -> str | None:
    """transformers GPT-NeoX tensor name -> ours, or None for a buffer that is not a weight."""
    name = name.removeprefix("gpt_neox.")
    if name == "lm_head.weight":
        return "embed_out.weight"
    if _HF_BUFFERS.search(name):
        return None
    return name


def _read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a transformers folder: model.safetensors or its shards, renamed to ours."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shard_names]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} holds only pickle weights (pytorch_model.bin), which newllm does not load; "
            "convert them with transformers: GPTNeoXForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder) writes model.safetensors"
        )
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors")
    tensors: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                ours = hf_weight_name(key)
                if ours is not None:
                    tensors[ours] = f.get_tensor(key)
    if "embed_out.weight" not in tensors and "embed_in.weight" in tensors:
        log.debug("no LM head in %s: expecting tied embeddings", folder)
    return tensors


def _hf_model(folder: Path, data: dict[str, Any], *, device: torch.device | str | None,
              dtype: Dtype) -> TransformerLM:
    config = hf_config_to_model_config(data)
    tensors = _read_hf_weights(folder)
    if not config.tie_word_embeddings and "embed_out.weight" not in tensors:
        raise CheckpointError(
            f"{folder} has no LM head (lm_head.weight or embed_out.weight); a GPTNeoXModel "
            "without the head cannot generate text: save a GPTNeoXForCausalLM"
        )
    return build_model(config, tensors, device=device, dtype=dtype, source=str(folder))


def from_hf(path_or_repo_id: str | Path, *, dtype: Dtype = None,
            device: torch.device | str | None = None,
            revision: str | None = None) -> tuple[TransformerLM, Tokenizer]:
    """Import a transformers GPT-NeoX checkpoint (e.g. Pythia) as a ``pythia``-only model.

    ``path_or_repo_id`` is a folder written by transformers' ``save_pretrained`` (config.json,
    model.safetensors or shards, tokenizer.json) or a hub id like ``EleutherAI/pythia-70m``
    (``revision`` picks e.g. a training step branch). Only safetensors weights are read.
    Names map by dropping ``gpt_neox.`` and renaming ``lm_head`` (or old ``embed_out``) to
    ``embed_out``; the logits equal ``GPTNeoXForCausalLM``'s.
    """
    folder = Path(path_or_repo_id).expanduser()
    if not folder.is_dir():
        folder = _download(str(path_or_repo_id), revision)
    data = _read_config(folder)
    model = _hf_model(folder, data, device=device, dtype=dtype)
    return model, _folder_tokenizer(folder, model, "write one next to the weights, e.g. "
                                    "AutoTokenizer.from_pretrained(<the original model>)"
                                    ".save_pretrained(folder)")


def _download(repo_id: str, revision: str | None) -> Path:
    if not _HUB_ID.match(repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither a folder nor a Hugging Face hub id ('owner/name')"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise ImportError("downloading from the hub needs huggingface_hub: "
                          "pip install huggingface_hub") from exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise FileNotFoundError(
            f"no local folder {repo_id!r}, and could not fetch it from the hub "
            f"(Hugging Face; {type(exc).__name__}: {first_line}). Check the path or id and the "
            "network, or download the model elsewhere and pass its local folder"
        ) from exc


# one entry point ---------------------------------------------------------------------------
def load_checkpoint(spec: str | Path | None = None, *, device: torch.device | str | None = None,
                    dtype: Dtype = None) -> tuple[TransformerLM, Tokenizer]:
    """(model, tokenizer) from a folder, preset name, hub id, or None (the bundled default).

    See the module docstring for how ``spec`` is resolved. The bundled default is stored in half
    precision to stay small and runs in float32 unless ``dtype`` says otherwise (on CPUs without
    bf16/fp16 instructions half precision is emulated and several times slower).
    """
    if spec is None:
        if (DEFAULT_CHECKPOINT / "config.json").is_file():
            return _load_folder(DEFAULT_CHECKPOINT, device, dtype or torch.float32)
        log.warning("no bundled checkpoint in %s; using an untrained %r (seed %d) with the "
                    "byte-level tokenizer", DEFAULT_CHECKPOINT, FALLBACK_PRESET, FALLBACK_SEED)
        return _fresh(FALLBACK_PRESET, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds it")
    if str(spec) in PRESETS:
        return _fresh(str(spec), device, dtype)
    if _HUB_ID.match(str(spec)):
        return from_hf(str(spec), dtype=dtype, device=device)
    raise FileNotFoundError(
        f"{str(spec)!r} is not a checkpoint folder, a preset or a hub id ('owner/name'); "
        f"presets are {sorted(PRESETS)}"
    )


def _load_folder(folder: Path, device: torch.device | str | None,
                 dtype: Dtype) -> tuple[TransformerLM, Tokenizer]:
    data = _read_config(folder)
    if "model_type" in data:
        return from_hf(folder, dtype=dtype, device=device)
    model = from_pretrained(folder, device=device, dtype=dtype)
    return model, _folder_tokenizer(folder, model, "save the checkpoint with "
                                    "save_pretrained(model, folder, tokenizer)")


def _folder_tokenizer(folder: Path, model: TransformerLM, hint: str) -> Tokenizer:
    """The folder's tokenizer.json, checked against the model; ``hint`` says how to add one."""
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; {hint}")
    tokenizer = Tokenizer.from_file(tok_path, eos_token_id=model.config.eos_token_id)
    check_tokenizer(model.config, tokenizer)
    return tokenizer


def _fresh(preset: str, device: torch.device | str | None,
           dtype: Dtype) -> tuple[TransformerLM, Tokenizer]:
    """A freshly initialised preset (seed 0, global RNG left as it was) + byte-level tokenizer."""
    config = ModelConfig.from_name(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FALLBACK_SEED)
        model = TransformerLM(config)
    model.remember_checkpoint()  # the float32 weights of the seed are the checkpoint
    target = resolve_dtype(dtype)
    if device is not None or target is not None:
        model.to(device=device, dtype=target)
    tokenizer = Tokenizer.byte_level()
    check_tokenizer(config, tokenizer)
    return model.eval(), tokenizer


# warm starts -------------------------------------------------------------------------------
def _fits(source: Tensor | None, target: Tensor) -> bool:
    return source is not None and source.shape == target.shape


def transfer_weights(target: TransformerLM, source: TransformerLM) -> tuple[list[str], list[str]]:
    """Copy into ``target`` every tensor of ``source`` with the same name and shape.

    One rename: a memory layer's ``key_shift`` (``memory_key_shift``) becomes the first lag of
    ``key_history`` (``memory_history``, which generalises the shift), the other lags left as
    they start (0), so a shifted model given a history computes what it did before as long as
    the query weights are 0, as they start. Returns (copied, kept): the names of ``target``
    copied (or filled from ``key_shift``), and the names left as they were.
    """
    src = source.state_dict()
    copied, kept = [], []
    tied = target.config.tie_word_embeddings
    with torch.no_grad():
        for name, t in target.state_dict().items():
            s = src.get(name)
            if tied and name == "embed_out.weight":  # the same tensor as embed_in.weight
                (copied if "embed_in.weight" in copied else kept).append(name)
            elif s is not None and s.shape == t.shape:
                t.copy_(s)
                copied.append(name)
            elif name.endswith("attention.key_history") and _fits(
                    shift := src.get(name.removesuffix("key_history") + "key_shift"), t[:, :1]):
                t.zero_()
                t[:, :1] = shift
                copied.append(name)
            else:
                kept.append(name)
    return copied, kept


def init_from_pythia(config: ModelConfig, source: TransformerLM) -> TransformerLM:
    """A new model of ``config`` that starts from a trained (pythia) model where it can.

    Embeddings, norms, MLPs, attention projections and the LM head are copied wherever the name
    and shape match (a memory layer's query_key_value/dense match a pythia layer's); the rest
    (memory gates, context block, layers of another width) is freshly initialised from the
    global RNG. The copied and fresh names are logged at INFO; `transfer_weights` returns them.
    """
    model = TransformerLM(config).to(device=source.device, dtype=source.dtype)
    copied, kept = transfer_weights(model, source)
    if not copied:  # a fresh model under the name of a warm start would mislead a whole run
        s = source.config
        raise CheckpointError(
            f"init_from_pythia: no tensor of {config.name!r} (hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}) has a name and shape of the source {s.name!r} (hidden "
            f"{s.hidden_size}, vocab {s.vocab_size}); build the config from the source's, "
            f"e.g. source.config.replace(name=..., layers=(...), segment_local=True), so the "
            f"shapes agree")
    log.info("init_from_pythia: copied %d tensors %s; fresh %d %s", len(copied), copied,
             len(kept), kept)
    return model
