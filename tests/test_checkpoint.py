"""Checkpoint folders: exact round trips for every tiny preset, dtypes, refusals with clear
errors, `load_checkpoint` for each kind of spec, and warm starts from a pythia model."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from newllm import checkpoint
from newllm.checkpoint import (
    CheckpointError,
    from_pretrained,
    init_from_pythia,
    load_checkpoint,
    save_pretrained,
    transfer_weights,
)
from newllm.config import ModelConfig
from newllm.model import TransformerLM
from newllm.tokenizer import Tokenizer

TINY_PRESETS = ["tiny-pythia", "tiny-infini", "tiny-multi-memory", "tiny-hierarchical",
                "tiny-context-pythia", "tiny-context-kv"]
T = 40  # crosses segment (16) and chunk (8) boundaries of the tiny presets

ModelFactory = Callable[..., TransformerLM]


def logits_of(model: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_round_trip_is_exact(preset: str, tiny_model: ModelFactory, byte_tokenizer: Tokenizer,
                             tmp_path: Path) -> None:
    model = tiny_model(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    folder = save_pretrained(model, tmp_path / preset, byte_tokenizer)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    loaded = from_pretrained(folder)
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    assert loaded.fingerprint() == model.fingerprint()
    # continuing from a state works the same on the loaded model
    _, state = model(ids[:, :T // 2])
    _, state2 = loaded(ids[:, :T // 2])
    assert torch.equal(model(ids[:, T // 2:], state)[0], loaded(ids[:, T // 2:], state2)[0])


def test_loading_leaves_global_rng_alone(tiny_checkpoint: Path) -> None:
    before = torch.get_rng_state()
    from_pretrained(tiny_checkpoint)
    load_checkpoint("tiny-pythia")
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_save(dtype: torch.dtype, tiny_model: ModelFactory,
                            byte_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model("tiny-infini")
    folder = save_pretrained(model, tmp_path / "ckpt", byte_tokenizer, dtype=dtype)
    assert model.dtype == torch.float32  # saving does not change the model
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["dtype"] == str(dtype).removeprefix("torch.")
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    ids = torch.randint(0, 512, (1, T))
    loaded = from_pretrained(folder)
    assert loaded.dtype == dtype
    reference = copy.deepcopy(model).to(dtype)
    assert torch.equal(logits_of(loaded, ids), logits_of(reference, ids))
    upcast = from_pretrained(folder, dtype=torch.float32)
    assert upcast.dtype == torch.float32
    err = (logits_of(upcast, ids) - logits_of(model, ids)).abs().max().item()
    assert 0 < err < 0.1  # rounded weights: close, not equal


def test_dtype_names(tiny_checkpoint: Path) -> None:
    assert from_pretrained(tiny_checkpoint, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        from_pretrained(tiny_checkpoint, dtype="float8")


def test_tied_embeddings_round_trip(tiny_model: ModelFactory, tmp_path: Path) -> None:
    model = tiny_model("tiny-pythia", tie_word_embeddings=True)
    folder = save_pretrained(model, tmp_path / "tied")
    assert "embed_out.weight" not in load_file(str(folder / "model.safetensors"))
    loaded = from_pretrained(folder)
    assert loaded.embed_out.weight is loaded.embed_in.weight
    ids = torch.randint(0, 512, (1, 12))
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))


def test_unknown_config_key_is_refused(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "config.json"
    data = json.loads(path.read_text())
    data["segment_lenght"] = 8
    path.write_text(json.dumps(data))
    expected = r"config.json: unknown config keys \['segment_lenght'\]"
    with pytest.raises(CheckpointError, match=expected):
        from_pretrained(tiny_checkpoint)


def test_bad_config_json(tiny_checkpoint: Path) -> None:
    (tiny_checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(tiny_checkpoint)


def test_missing_unexpected_and_misshapen_weights(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    name = "layers.1.mlp.dense_h_to_4h.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(path))
    with pytest.raises(CheckpointError, match=rf"missing {name}, unexpected none"):
        from_pretrained(tiny_checkpoint)
    save_file({**tensors, "layers.9.extra": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"missing none, unexpected layers\.9\.extra"):
        from_pretrained(tiny_checkpoint)
    save_file({**tensors, name: torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=rf"{name} \(3, 3\) \(config wants \(256, 64\)\)"):
        from_pretrained(tiny_checkpoint)


def test_missing_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")
    (tiny_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_checkpoint(tiny_checkpoint)
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(tiny_checkpoint)


def test_tokenizer_must_fit_model(tiny_model: ModelFactory, byte_tokenizer: Tokenizer,
                                  tmp_path: Path) -> None:
    small = tiny_model("tiny-pythia", vocab_size=200)
    with pytest.raises(CheckpointError, match="tokenizer has 257 tokens but the model only 200"):
        save_pretrained(small, tmp_path / "a", byte_tokenizer)
    other_eos = tiny_model("tiny-pythia", eos_token_id=5)
    with pytest.raises(CheckpointError, match="EOS id is 0 but the model config says 5"):
        save_pretrained(other_eos, tmp_path / "b", byte_tokenizer)


def test_resave_replaces_files(tiny_model: ModelFactory, byte_tokenizer: Tokenizer,
                               tmp_path: Path) -> None:
    folder = save_pretrained(tiny_model("tiny-pythia"), tmp_path / "c", byte_tokenizer)
    second = tiny_model("tiny-pythia", seed=1)
    save_pretrained(second, folder)  # no tokenizer: the existing tokenizer.json stays
    assert from_pretrained(folder).fingerprint() == second.fingerprint()
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]


# load_checkpoint -----------------------------------------------------------------------------
def test_load_checkpoint_folder(tiny_checkpoint: Path, tiny_model: ModelFactory,
                                byte_tokenizer: Tokenizer) -> None:
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    assert model.fingerprint() == tiny_model("tiny-infini").fingerprint()
    assert tokenizer.sha256 == byte_tokenizer.sha256
    model2, _ = load_checkpoint(str(tiny_checkpoint), dtype=torch.bfloat16)
    assert model2.dtype == torch.bfloat16


def test_load_checkpoint_preset_is_seeded() -> None:
    a, tok = load_checkpoint("tiny-context-kv")
    b, _ = load_checkpoint("tiny-context-kv")
    assert a.config == ModelConfig.from_name("tiny-context-kv")
    assert a.fingerprint() == b.fingerprint()
    assert tok.eos_token_id == a.config.eos_token_id and tok.vocab_size == 257
    assert not a.training


def test_load_checkpoint_default_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          tiny_model: ModelFactory) -> None:
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "bundle")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "README.md").write_text("written by training later\n")
    model, tokenizer = load_checkpoint()
    assert model.config == ModelConfig.from_name("tiny-infini")
    assert model.fingerprint() == load_checkpoint("tiny-infini")[0].fingerprint()
    assert tokenizer.sha256 == Tokenizer.byte_level().sha256
    # once a bundle is there, it is what None loads
    bundled = tiny_model("tiny-pythia", seed=7)
    save_pretrained(bundled, tmp_path / "bundle", tokenizer)
    model, _ = load_checkpoint(None)
    assert model.fingerprint() == bundled.fingerprint()


def test_load_checkpoint_real_default_works() -> None:
    model, tokenizer = load_checkpoint(None)
    assert tokenizer.vocab_size <= model.config.vocab_size
    assert tokenizer.eos_token_id == model.config.eos_token_id
    ids = torch.tensor([tokenizer.encode("hello there")])
    assert logits_of(model, ids).shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.dtype == torch.float32  # stored in half precision, run in float32


def test_load_checkpoint_bad_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   tiny_checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a checkpoint folder, a preset.*tiny-infini"):
        load_checkpoint("tiny-infinni")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tiny_checkpoint / "config.json")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = "no local folder 'nobody/no-such-model', and could not fetch it from the hub"
    with pytest.raises(FileNotFoundError, match=expected):
        load_checkpoint("nobody/no-such-model")


# warm starts ---------------------------------------------------------------------------------
def test_init_from_pythia_copies_matching_tensors(tiny_model: ModelFactory) -> None:
    source = tiny_model("tiny-pythia", seed=3)
    model = init_from_pythia(ModelConfig.from_name("tiny-infini"), source)
    src, new = source.state_dict(), model.state_dict()
    for name in ("embed_in.weight", "embed_out.weight", "final_layer_norm.weight"):
        assert torch.equal(new[name], src[name])
    # layer 1 is pythia in both: every tensor copied
    layer1 = [n for n in src if n.startswith("layers.1.")]
    assert layer1 and all(torch.equal(new[n], src[n]) for n in layer1)
    # layer 0 is infini: its projections, norms and MLP have pythia's names and shapes
    assert torch.equal(new["layers.0.attention.query_key_value.weight"],
                       src["layers.0.attention.query_key_value.weight"])
    name = "layers.0.mlp.dense_4h_to_h.bias"
    assert torch.equal(new[name], src[name])
    assert "layers.0.attention.gate" not in src  # fresh
    copied, kept = transfer_weights(tiny_model("tiny-infini"), source)
    assert set(copied) == set(src)
    assert kept == ["layers.0.attention.gate"]


def test_transfer_turns_the_key_shift_into_the_first_lag_of_a_history(
        tiny_model: ModelFactory) -> None:
    shifted = tiny_model("tiny-infini", memory_key_shift=True)
    with torch.no_grad():
        shifted.layers[0].attention.key_shift.uniform_(-1.0, 1.0)  # not its start (ones)
    target = tiny_model("tiny-infini", seed=5, memory_history=3, memory_write_gate=True)
    copied, kept = transfer_weights(target, shifted)
    history = target.layers[0].attention.key_history
    assert "layers.0.attention.key_history" in copied
    assert torch.equal(history[:, :1], shifted.layers[0].attention.key_shift)
    assert not history[:, 1:].any()
    assert set(kept) == {"layers.0.attention.query_history", "layers.0.attention.write_gate",
                         "layers.0.attention.write_gate_bias"}
    ids = torch.randint(0, 256, (2, 50))  # several segments, so the memory is read
    with torch.no_grad():
        target.layers[0].attention.write_gate_bias.fill_(30.0)  # write strength 1: plain rule
        torch.testing.assert_close(target(ids)[0], shifted(ids)[0])


def test_init_from_pythia_refuses_a_config_that_shares_nothing(
        tiny_model: ModelFactory) -> None:
    source = tiny_model("tiny-pythia", seed=3)
    unrelated = ModelConfig.from_name("tiny-infini", hidden_size=32, vocab_size=300,
                                      intermediate_size=96)
    with pytest.raises(CheckpointError, match="source.config.replace"):
        init_from_pythia(unrelated, source)
    fits = source.config.replace(name="mine", layers=("infini", "pythia"))  # the documented way
    assert init_from_pythia(fits, source).embed_in.weight.shape == source.embed_in.weight.shape


def test_init_from_pythia_other_width(tiny_model: ModelFactory) -> None:
    source = tiny_model("tiny-pythia", seed=3)
    model = init_from_pythia(ModelConfig.from_name("tiny-context-pythia"), source)
    copied, kept = transfer_weights(model, source)
    assert "embed_in.weight" in copied  # hidden 64 in both
    assert "embed_out.weight" in kept  # 32-wide layers: another shape
    assert any(n.startswith("context_block.") for n in kept)
    assert "layers.0.input_layernorm.weight" in kept  # 32 wide, the source's are 64
    assert torch.equal(model.embed_in.weight, source.embed_in.weight)


def test_saved_checkpoints_tell_transformers_their_eos(tmp_path: Path) -> None:
    """tokenizer_config.json / special_tokens_map.json: AutoTokenizer finds EOS (and BOS) in a
    saved checkpoint and in the bundled one, and tokenizes as our tokenizer does."""
    from conftest import make_tiny_model
    from transformers import AutoTokenizer

    from newllm.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_pretrained
    from newllm.tokenizer import Tokenizer

    model = make_tiny_model("tiny-infini")
    folder = save_pretrained(model, tmp_path / "ckpt", Tokenizer.byte_level())
    _, bundled_tok = load_checkpoint(None)
    for where, ours in ((folder, Tokenizer.byte_level()), (DEFAULT_CHECKPOINT, bundled_tok)):
        theirs = AutoTokenizer.from_pretrained(str(where))
        assert theirs.eos_token_id == theirs.bos_token_id == ours.eos_token_id
        text = "Hello there, reader."
        assert theirs(text).input_ids == ours.encode(text)
