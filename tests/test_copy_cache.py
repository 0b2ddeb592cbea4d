"""`scripts/copy_cache.py`, which trains a pointer cache onto a frozen model: its training loss is
the model's own (`TransformerLM.forward` with ``targets``), only the pointer's weights move, and
it saves, reloads and evaluates end to end on a tiny checkpoint (the checkpoint it writes
computes what the model it trained computes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


def cache_module() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "copy_cache.py"
    spec = importlib.util.spec_from_file_location("copy_cache", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["copy_cache"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_script_trains_saves_and_evaluates(tmp_path: Path, tiny_checkpoint: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from newllm.checkpoint import load_checkpoint

    cc = cache_module()
    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"word{i % 37} and the other{i % 11}." for i in range(3000)))
    out, weights = tmp_path / "run.json", tmp_path / "cache.safetensors"
    folder = tmp_path / "with-pointer"
    common = ["--checkpoint", str(tiny_checkpoint), "--filler", str(text),
              "--value-choice", "3", "--value-fillers", "0", "1", "--chat", "2"]
    assert cc.main([*common, "--dk", "8", "--gate-inputs", "focus", "momentum",
                    "--data", str(text), "--steps", "3", "--batch-size", "2", "--length", "256",
                    "--log-every", "1", "--lr", "3e-2", "--save", str(weights),
                    "--save-checkpoint", str(folder), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["step"] for r in got["curve"]] == [1, 2, 3]
    assert set(got["curve"][-1]["gate_read"]) == {"focus", "momentum"}
    for row in got["value_choice"]["by_fillers"].values():
        assert 0 <= row["top1"] <= 1 and 0 < row["chance"] < 1
    assert got["chat"]["conversations"] == 2

    # the folder: the frozen model's weights unchanged, a trained pointer beside them
    start, _ = load_checkpoint(tiny_checkpoint, dtype=torch.float32)
    model, _ = load_checkpoint(folder, dtype=torch.float32)
    assert model.config.pointer_dim == 8 and model.pointer is not None
    assert model.config.pointer_gate_inputs == ("focus", "momentum")
    before = dict(start.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("pointer."):
            continue
        torch.testing.assert_close(p, before[name].half().float(), atol=0, rtol=0)
    assert float(model.pointer.gate_read.detach().abs().min()) > 0  # trained from 0

    # the state a long prefix leaves, built from the frozen model's key inputs with the
    # pointer's weights, is the one the model's own reading leaves
    ids = torch.randint(1, 60, (1, 300), generator=torch.Generator().manual_seed(0))
    u, got_ids = cc.read_prose(model, ids[0].numpy(), 300, __import__("random").Random(0))
    assert torch.equal(got_ids, ids)
    with torch.no_grad():
        built = cc.prefix_state(model.pointer, u, ids, 2)
        _, read = model(ids)
    for name in ("mass", "z", "last"):
        for row in range(2):
            torch.testing.assert_close(getattr(built, name)[row],
                                       getattr(read.pointer, name)[0], atol=1e-4, rtol=1e-5)
    # trained with pass-key examples and windows read after long prefixes
    assert cc.main(["--checkpoint", str(folder), "--data", str(text), "--steps", "4",
                    "--batch-size", "2", "--length", "256", "--passkey-fraction", "0.5",
                    "--prefix-tokens", "512", "--prefix-fraction", "1", "--log-every", "1",
                    "--out", str(tmp_path / "prefix.json")]) == 0
    curve = json.loads((tmp_path / "prefix.json").read_text())["curve"]
    assert all(256 <= r["prefix"] <= 512 for r in curve)
    # a span added to the trained pointer, trained after long prefixes too
    wide = tmp_path / "span"
    assert cc.main(["--checkpoint", str(folder), "--data", str(text), "--steps", "2",
                    "--batch-size", "2", "--length", "256", "--span", "3",
                    "--prefix-tokens", "512", "--prefix-fraction", "1", "--log-every", "1",
                    "--save-checkpoint", str(wide), "--out", str(tmp_path / "span.json")]) == 0
    curve = json.loads((tmp_path / "span.json").read_text())["curve"]
    assert len(curve[-1]["span_read"]) == 2
    spanned, _ = load_checkpoint(wide, dtype=torch.float32)
    assert spanned.config.pointer_span == 3
    with torch.no_grad():
        built = cc.prefix_state(spanned.pointer, spanned.pointer.inputs(
            *spanned.hidden_states(ids)[:2]), ids, 2)
        _, read = spanned(ids)
    torch.testing.assert_close(built.span_mass[1], read.pointer.span_mass[0], atol=1e-4,
                               rtol=1e-5)
    assert cc.main(["--checkpoint", str(wide), "--data", str(text), "--steps", "1",
                    "--batch-size", "1", "--length", "128"]) == 0  # trained further as it is
    late = tmp_path / "delay"  # and with a delay, after prefixes (their pairs partly pending)
    assert cc.main(["--checkpoint", str(wide), "--data", str(text), "--steps", "1",
                    "--batch-size", "1", "--length", "128", "--delay", "16",
                    "--prefix-tokens", "512", "--prefix-fraction", "1",
                    "--save-checkpoint", str(late)]) == 0
    assert load_checkpoint(late)[0].config.pointer_delay == 16
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cc.main(["--checkpoint", str(wide), "--span", "2"])
    assert "span 1" in capsys.readouterr().err

    # the pointer's weights alone, loaded onto the model again: the same evaluations
    again = tmp_path / "again.json"
    assert cc.main([*common, "--dk", "8", "--gate-inputs", "focus", "momentum",
                    "--load", str(weights), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["value_choice"] == got["value_choice"]
    # and the saved checkpoint trains further; its own options are kept, not given again
    assert cc.main(["--checkpoint", str(folder), "--data", str(text), "--steps", "1",
                    "--batch-size", "1", "--length", "128"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cc.main(["--checkpoint", str(folder), "--dk", "4"])
    assert "already has a pointer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cc.main(["--checkpoint", str(tiny_checkpoint), "--gate-inputs", "size"])
    assert "unknown pointer gate input 'size'" in capsys.readouterr().err
