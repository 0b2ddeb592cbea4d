"""Tests for the ``newllm`` command (newllm.cli): generate, memory files, info, dispatch, errors."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import pytest

from newllm.checkpoint import load_checkpoint
from newllm.cli import main
from newllm.generation import SamplingParams, generate
from newllm.memory_file import load_memory

GREEDY = ["--checkpoint", "tiny-pythia", "--temperature", "0"]


def expected_text(prompt: str, max_tokens: int, state=None):
    """What `newllm generate` should print, computed with the library directly."""
    model, tok = load_checkpoint("tiny-pythia")
    stream = generate(model, tok.encode(prompt), state,
                      SamplingParams(max_new_tokens=max_tokens, temperature=0),
                      decode=tok.decode, vocab_size=tok.vocab_size).collect()
    return stream


def test_generate_prints_the_generated_text(capsys):
    assert main(["generate", *GREEDY, "--prompt", "Hello", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    want = expected_text("Hello", 12)
    assert want.text.strip()  # something visible was generated
    assert out == want.text + "\n"


def test_generate_stream_prints_the_same_text(capsys):
    assert main(["generate", *GREEDY, "--prompt", "Hello", "--max-tokens", "12",
                 "--stream"]) == 0
    assert capsys.readouterr().out == expected_text("Hello", 12).text + "\n"


def test_generate_reads_the_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    assert main(["generate", *GREEDY, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected_text("Hello", 12).text + "\n"


def test_seeded_sampling_is_reproducible(capsys):
    argv = ["generate", "--checkpoint", "tiny-pythia", "--prompt", "abc", "--max-tokens", "16",
            "--temperature", "1.0", "--seed", "7", "--top-k", "50", "--top-p", "0.9"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_verbose_reports_counts_on_stderr(capsys):
    assert main(["generate", *GREEDY, "--prompt", "Hi", "--max-tokens", "5", "-v"]) == 0
    err = capsys.readouterr().err
    assert "2 prompt + 5 generated tokens" in err and "finish_reason=length" in err


def test_memory_out_then_memory_in_continues_the_session(capsys, tmp_path):
    path = tmp_path / "session.safetensors"
    assert main(["generate", *GREEDY, "--prompt", "My name is Ada.", "--max-tokens", "6",
                 "--memory-out", str(path)]) == 0
    capsys.readouterr()
    first = expected_text("My name is Ada.", 6)
    model, tok = load_checkpoint("tiny-pythia")
    saved = load_memory(path, model, tokenizer_hash=tok.sha256)
    assert saved.position == len(tok.encode("My name is Ada.")) + 6 == first.state.position

    assert main(["generate", *GREEDY, "--prompt", " Who am I?", "--max-tokens", "8",
                 "--memory-in", str(path), "--memory-out", str(path)]) == 0
    second = expected_text(" Who am I?", 8, first.state)
    assert capsys.readouterr().out == second.text + "\n"
    assert load_memory(path, model).position == second.state.position


def test_missing_memory_file_exits_1_with_a_message(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    code = main(["generate", *GREEDY, "--prompt", "x", "--memory-in", str(missing)])
    err = capsys.readouterr().err
    assert code == 1
    assert "nope.safetensors" in err and "Traceback" not in err


def test_corrupt_memory_file_exits_1(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a memory file at all")
    assert main(["generate", *GREEDY, "--prompt", "x", "--memory-in", str(bad)]) == 1
    assert "error" in capsys.readouterr().err


def test_memory_of_another_model_is_refused(capsys, tmp_path):
    path = tmp_path / "infini.safetensors"
    assert main(["generate", "--checkpoint", "tiny-infini", "--temperature", "0", "--prompt",
                 "abc", "--max-tokens", "2", "--memory-out", str(path)]) == 0
    capsys.readouterr()
    assert main(["generate", *GREEDY, "--prompt", "x", "--memory-in", str(path)]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["generate", "--bogus"],
    ["generate", "--max-tokens", "many"],
    ["generate", "--temperature", "-1", "--prompt", "x"],
    ["generate", "--top-p", "2", "--prompt", "x"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_bad_sampling_value_names_the_flag(capsys):
    assert main(["generate", "--max-tokens", "-3", "--prompt", "x"]) == 2
    assert "--max-tokens" in capsys.readouterr().err


def test_unknown_checkpoint_exits_1(capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) == 1
    assert "none" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "info", "train", "eval", "serve", "bench"):
        assert command in out


def test_info_reports_size_fingerprint_and_state_bytes(capsys):
    assert main(["info", "--checkpoint", "tiny-pythia", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, _ = load_checkpoint("tiny-pythia")
    assert report["parameters"] == model.num_parameters()
    assert report["fingerprint"] == model.fingerprint()
    assert report["config"]["name"] == "tiny-pythia"
    per_token = model.config.num_layers * 2 * model.config.hidden_size * 4  # k and v, fp32
    assert report["state_bytes"]["1000"] == 1000 * per_token
    assert report["state_bytes_per_1k_tokens"] == 1000 * per_token
    assert main(["info", "--checkpoint", "tiny-infini", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    infini, _ = load_checkpoint("tiny-infini")
    S = infini.config.segment_len
    for p in ("1000", "8000", "64000"):  # the worst is the largest state of that segment
        start = int(p) - int(p) % S
        sizes = [sum(math.prod(s) * 4 for s in infini.state_shapes(1, q).values())
                 for q in range(start, start + S)]
        assert report["state_bytes_worst_in_segment"][p] == max(sizes)
        assert report["state_bytes"][p] in sizes
    assert main(["info", "--checkpoint", "tiny-infini"]) == 0
    text = capsys.readouterr().out
    assert "fingerprint:" in text and "0 bytes per 1k tokens (fixed-size memory)" in text
    assert "within its segment" in text


def test_dispatch_passes_the_remaining_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("server.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "server.cli", fake)
    assert main(["serve", "--port", "9000", "--help"]) == 3
    assert seen["argv"] == ["--port", "9000", "--help"]


def test_dispatch_turns_system_exit_into_a_code(monkeypatch):
    fake = types.ModuleType("benchmarks.cli")

    def bench(argv):
        raise SystemExit(2)

    fake.main = bench
    monkeypatch.setitem(sys.modules, "benchmarks.cli", fake)
    assert main(["bench", "--nope"]) == 2


def test_missing_optional_module_names_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "training.cli", None)  # import raises ModuleNotFoundError
    assert main(["train", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "training.cli" in err and "Traceback" not in err


def test_a_preset_is_announced_as_untrained(capsys):
    assert main(["generate", *GREEDY, "--prompt", "hi", "--max-tokens", "2"]) == 0
    assert "random (untrained) weights" in capsys.readouterr().err
