"""Parity with transformers' GPT-NeoX: a random `GPTNeoXForCausalLM`, written by its own
`save_pretrained`, imported with `from_hf`, gives the same logits in one forward pass and in
incremental decoding (our state against transformers' cache). Also old-style folders
(``embed_out``, ``rotary_pct``), sharded weights, and refusals of what we do not implement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from newllm.checkpoint import CheckpointError, from_hf, from_pretrained, load_checkpoint
from newllm.tokenizer import Tokenizer

VOCAB = 300
TOL = 1e-4


def randomise(model: torch.nn.Module, std: float = 0.1) -> None:
    """Every weight and bias random (std <= 0.15 keeps fp32 noise small); norms near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def hf_folder(folder: Path, **options: Any) -> GPTNeoXForCausalLM:
    """A random tiny GPT-NeoX saved by transformers into ``folder`` (+ a tokenizer.json)."""
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=256, eos_token_id=0,
                    bos_token_id=0, attn_implementation="eager")
    settings.update(options)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).eval()
    randomise(hf)
    hf.save_pretrained(folder, max_shard_size=settings.get("shard", "50MB"))
    Tokenizer.byte_level().save(folder / "tokenizer.json")
    return hf


def assert_same_logits(hf: GPTNeoXForCausalLM, model: torch.nn.Module, T: int = 24) -> None:
    ids = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref = hf(ids).logits  # (B, T, V)
        ours, _ = model(ids)
        assert (ours - ref).abs().max().item() <= TOL

        # incremental: a prefill, then one token at a time, then a chunk of three
        out = hf(ids[:, :5], use_cache=True)
        cache = out.cache
        logits, state = model(ids[:, :5])
        assert (logits - out.logits).abs().max().item() <= TOL
        for t in range(5, T - 3):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits, state = model(ids[:, t:t + 1], state)
            assert (logits - out.logits).abs().max().item() <= TOL, f"step {t}"
        out = hf(ids[:, T - 3:], cache=cache, use_cache=True)
        logits, state = model(ids[:, T - 3:], state)
        assert (logits - out.logits).abs().max().item() <= TOL
        assert (logits - ref[:, T - 3:]).abs().max().item() <= TOL
        assert state.position == T


@pytest.mark.parametrize("heads", [4, 8], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("rotary", [0.25, 1.0], ids=lambda r: f"rot{r}")
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
def test_parity(parallel: bool, rotary: float, heads: int, tmp_path: Path) -> None:
    hf = hf_folder(tmp_path, use_parallel_residual=parallel, num_attention_heads=heads,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": rotary},
                   num_hidden_layers=3 if heads == 8 else 2)
    model, tokenizer = from_hf(tmp_path)
    c = model.config
    assert c.layers == ("pythia",) * hf.config.num_hidden_layers
    assert (c.num_heads, c.rotary_pct, c.use_parallel_residual) == (heads, rotary, parallel)
    assert tokenizer.eos_token_id == 0
    assert_same_logits(hf, model)


def test_tied_embeddings(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path, tie_word_embeddings=True)
    model, _ = from_hf(tmp_path)
    assert model.config.tie_word_embeddings
    assert model.embed_out.weight is model.embed_in.weight
    assert_same_logits(hf, model, T=12)


def test_sharded_weights_and_lm_head_name(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path / "sharded", shard="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(hf, from_hf(tmp_path / "sharded")[0], T=12)

    # the 5.x in-memory name lm_head.weight is read as well as embed_out.weight
    hf = hf_folder(tmp_path / "named")
    path = tmp_path / "named" / "model.safetensors"
    tensors = load_file(str(path))
    head = tensors.pop("embed_out.weight", None)
    if head is None:
        head = tensors.pop("lm_head.weight")
    save_file({**tensors, "lm_head.weight": head}, str(path), metadata={"format": "pt"})
    assert_same_logits(hf, from_hf(tmp_path / "named")[0], T=12)


def test_old_style_folder(tmp_path: Path) -> None:
    """Config keys rotary_pct / rotary_emb_base, head named embed_out, old buffers in the file."""
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
              "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 96, "rotary_pct": 0.5,
              "rotary_emb_base": 500, "layer_norm_eps": 1e-3, "use_parallel_residual": True,
              "max_position_embeddings": 128, "hidden_act": "gelu", "eos_token_id": 0,
              "bos_token_id": 0, "tie_word_embeddings": False}
    torch.manual_seed(5)
    source = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config.items()
                                                 if k != "architectures"}))
    randomise(source)
    tensors = {("embed_out.weight" if k == "lm_head.weight" else f"gpt_neox.{k}"
                if not k.startswith("gpt_neox.") else k): v.contiguous()
               for k, v in source.state_dict().items()}
    for i in range(2):  # buffers that old checkpoints carried
        tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    Tokenizer.byte_level().save(tmp_path / "tokenizer.json")

    model, _ = from_hf(tmp_path)
    c = model.config
    assert (c.rotary_pct, c.rotary_base, c.layer_norm_eps) == (0.5, 500.0, 1e-3)
    assert torch.equal(model.embed_out.weight, tensors["embed_out.weight"])
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert_same_logits(hf, model, T=12)


def test_load_checkpoint_and_from_pretrained_read_hf_folders(tmp_path: Path) -> None:
    hf = hf_folder(tmp_path)
    model, tokenizer = load_checkpoint(tmp_path)
    assert tokenizer.sha256 == Tokenizer.byte_level().sha256
    assert_same_logits(hf, model, T=10)
    assert from_pretrained(tmp_path).fingerprint() == model.fingerprint()
    assert load_checkpoint(tmp_path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def write_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": False}, "attention_bias=False is not supported"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope type 'linear' is not supported"),
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
], ids=["no-bias", "tanh-gelu", "rope-scaling", "llama"])
def test_unsupported_configs_are_refused(changes: dict[str, Any], message: str,
                                         tmp_path: Path) -> None:
    hf_folder(tmp_path)
    write_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        from_hf(tmp_path)


def test_missing_pieces(tmp_path: Path) -> None:
    hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        from_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("embed_out.weight", None)
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path))
    Tokenizer.byte_level().save(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="has no LM head"):
        from_hf(tmp_path)
    path.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        from_hf(tmp_path)
