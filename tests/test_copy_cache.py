"""`scripts/copy_cache.py`: the cache's training form (attention over the window's pairs) agrees
with its memory form (M and z written token by token, `CacheRunner`), and without a cache the
runner gives the model's own log-probabilities; the script trains, saves and evaluates end to
end on a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from newllm.model import TransformerLM


def cache_module() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "copy_cache.py"
    spec = importlib.util.spec_from_file_location("copy_cache", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["copy_cache"] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("token_keys", [False, True])
def test_training_form_equals_the_memory_form(tiny_model: Callable[..., TransformerLM],
                                              token_keys: bool) -> None:
    cc = cache_module()
    model = tiny_model("tiny-infini")
    torch.manual_seed(3)
    cache = cc.CopyCache(model.config.layer_hidden, model.config.vocab_size, dk=8,
                         mix_bias=0.0, token_keys=token_keys)
    with torch.no_grad():  # sharper reads than the init's, so a wrong pairing would show
        for lin in (cache.query, cache.key, cache.write_gate):
            lin.weight.normal_(std=0.5)
    # repeated tokens, so that the pointer has something to point at
    ids = torch.tensor([5, 9, 5, 9, 7, 5, 9, 3, 5, 9, 7, 1, 5, 9, 7, 2, 5, 9])
    with torch.no_grad():
        h, logits, _ = cc.hidden_and_logits(model, ids[None, :-1])
        mixed, plain = cache.log_prob(h, logits, ids[None, 1:])
    rows, _ = cc.CacheRunner(model, cache).feed(ids[:-1].tolist(), cc.CacheRunner(model, cache)
                                                .empty)
    stepwise = rows.gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(mixed[0], stepwise, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - plain[0]).abs().max() > 1e-3  # the cache changed something
    assert torch.equal(mixed[0, 0], plain[0, 0])  # nothing to point at before token 1

    # fed in pieces from a saved state: the same rows
    runner = cc.CacheRunner(model, cache)
    first, st = runner.feed(ids[:7].tolist(), runner.empty)
    second, _ = runner.feed(ids[7:-1].tolist(), st)
    torch.testing.assert_close(torch.cat((first, second)), rows, atol=1e-5, rtol=1e-5)

    # without a cache: the model's own next-token log-probabilities
    alone, _ = cc.CacheRunner(model, None).feed(ids[:-1].tolist(),
                                                cc.CacheRunner(model, None).empty)
    torch.testing.assert_close(alone.gather(1, ids[1:, None])[:, 0], plain[0])


def test_the_script_trains_saves_and_evaluates(tmp_path: Path, tiny_checkpoint: Path) -> None:
    cc = cache_module()
    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"word{i % 37} and the other{i % 11}." for i in range(3000)))
    out, weights = tmp_path / "run.json", tmp_path / "cache.safetensors"
    common = ["--checkpoint", str(tiny_checkpoint), "--filler", str(text), "--dk", "8",
              "--value-choice", "3", "--value-fillers", "0", "1", "--chat", "2"]
    assert cc.main([*common, "--data", str(text), "--steps", "3", "--batch-size", "2",
                    "--length", "256", "--log-every", "1", "--save", str(weights),
                    "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["step"] for r in got["curve"]] == [1, 2, 3]
    assert weights.is_file()
    for row in got["value_choice"].values():
        assert 0 <= row["top1"] <= 1 and 0 < row["chance"] < 1
    assert got["chat"]["conversations"] == 2
    again, folder = tmp_path / "again.json", tmp_path / "with-pointer"
    assert cc.main([*common, "--load", str(weights), "--out", str(again),
                    "--save-checkpoint", str(folder)]) == 0
    assert json.loads(again.read_text())["value_choice"] == got["value_choice"]
    # the checkpoint written: the same model with the cache as its pointer, which computes
    # what the script's runner computes (up to the float16 the folder stores)
    from safetensors.torch import load_file

    from newllm.checkpoint import load_checkpoint

    model, _ = load_checkpoint(folder, dtype=torch.float32)
    assert model.config.pointer_dim == 8 and model.pointer is not None
    cache = cc.CopyCache(model.config.layer_hidden, model.config.vocab_size, dk=8)
    cache.load_state_dict(load_file(weights))
    for name, t in cache.state_dict().items():
        torch.testing.assert_close(model.pointer.state_dict()[name], t, atol=1e-3, rtol=1e-3)
    ids = list(range(3, 40)) * 3
    cache.load_state_dict(model.pointer.state_dict())  # the stored (rounded) weights
    base = TransformerLM(model.config.replace(pointer_dim=0)).eval()  # the same, no pointer
    base.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("pointer.")})
    runner = cc.CacheRunner(base, cache)
    rows, _ = runner.feed(ids, runner.empty)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    torch.testing.assert_close(logits[0], rows, atol=1e-4, rtol=1e-4)
