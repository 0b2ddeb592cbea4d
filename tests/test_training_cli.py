"""The command lines: train -> eval round trip, tokenizer, phase 1 -> phase 2, clear errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from training.cli import eval_main, main, phase1_main, tokenizer_main, train_main

WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops, one thread


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(10):
        rng = random.Random(i)
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)))
    return folder


def last_json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def test_train_then_eval(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    rc = train_main(["--data", str(corpus), "--out", str(out), "--preset", "tiny-infini",
                     "--steps", "4", "--batch-size", "2", "--segments", "2", "--log-every", "2",
                     "--cache-dir", "none", "--tokenizer-vocab", "300",
                     "--model-options", "gate_init=-1.0"])
    assert rc == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["steps"] == 4 and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["gate_init"] == -1.0
    assert json.loads((out / "config.json").read_text())["vocab_size"] <= 300
    report_path = tmp_path / "report.json"
    rc = eval_main(["--checkpoint", str(out), "--data", str(corpus / "d1.txt"),
                    str(corpus / "d2.txt"), "--window", "32", "--stride", "16", "--memory",
                    "--passkey", "--passkey-distances", "0", "1", "--passkey-trials", "2",
                    "--passkey-keys", "digits", "words", "--copy-test", "--copy-distances", "0",
                    "2", "--copy-trials", "2", "--out", str(report_path)])
    assert rc == 0
    report = last_json(capsys.readouterr().out)
    assert report == json.loads(report_path.read_text())
    assert len(report["perplexity"]["documents"]) == 2 and report["perplexity"]["ppl"] > 1
    assert set(report["passkey"]["by_distance"]) == {"0", "1"}
    assert report["passkey_words"]["key"] == "words"
    assert set(report["passkey_words"]["by_distance"]) == {"0", "1"}
    assert set(report["copy"]["repeat_nll"]) == set(report["copy"]["first_nll"]) == {"0", "2"}
    assert len(report["memory"]["documents"]) == 2
    assert eval_main(["--checkpoint", str(out), "--passkey", "--passkey-keys", "letters"]) == 2
    assert "--passkey-keys takes digits and/or words, got ['letters']" in (
        capsys.readouterr().err)


def test_tokenizer_phase1_then_phase2(tmp_path, corpus, capsys):
    tok = tmp_path / "tok.json"
    assert tokenizer_main(["--data", str(corpus), "--vocab-size", "280", "--out", str(tok)]) == 0
    assert last_json(capsys.readouterr().out)["vocab_size"] <= 280
    p1 = tmp_path / "p1"
    assert phase1_main(["--data", str(corpus), "--out", str(p1), "--tokenizer", str(tok),
                        "--batch-size", "256", "--max-tokens", "600",
                        "--max-iterations", "30", "--cache-dir", "none"]) == 0
    report = json.loads((p1 / "phase1.json").read_text())
    assert report["iterations"] <= 30 and "effective_rank_pct" in report["train"]
    assert json.loads((p1 / "config.json").read_text())["context_mode"] == "input"
    p2 = tmp_path / "p2"
    assert train_main(["--data", str(corpus), "--out", str(p2), "--init", str(p1),
                       "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                       "--cache-dir", "none"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(p1 / "model.safetensors")), load_file(str(p2 / "model.safetensors"))
    ctx = [k for k in a if k.startswith("context_block.")]
    assert ctx and all(torch.equal(a[k], b[k]) for k in ctx)  # frozen by default
    assert not torch.equal(a["embed_out.weight"], b["embed_out.weight"])


def test_train_only_freezes_the_rest_and_resumes(tmp_path, corpus, capsys):
    """--train-only: parameters matching a pattern change, all others stay bit for bit; the
    banner says what trains; a resumed run keeps the same split; a pattern that matches
    nothing is a clear error before anything is written."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    args = ["--data", str(corpus), "--preset", "tiny-infini", "--batch-size", "2",
            "--segments", "2", "--cache-dir", "none", "--tokenizer", "byte-level"]
    assert train_main([*args, "--out", str(base), "--steps", "1"]) == 0
    run = tmp_path / "run"
    only = ["--init", str(base), "--out", str(run), "--train-only", "layers.1.attention.*",
            "embed_out.weight"]
    assert train_main([*args, *only, "--steps", "4", "--stop-at", "2"]) == 0
    said = capsys.readouterr()
    assert "only layers.1.attention.*, embed_out.weight" in said.out + said.err
    assert train_main([*args, *only, "--steps", "4"]) == 0  # resumes from step 2
    assert last_json(capsys.readouterr().out)["steps"] == 4
    a, b = load_file(str(base / "model.safetensors")), load_file(str(run / "model.safetensors"))
    trained = {k for k in a if not torch.equal(a[k], b[k])}
    assert "embed_out.weight" in trained and "layers.1.attention.dense.weight" in trained
    assert all(k == "embed_out.weight" or k.startswith("layers.1.attention.") for k in trained)

    scaled = tmp_path / "scaled"
    assert train_main([*args, "--init", str(base), "--out", str(scaled), "--steps", "1",
                       "--lr-factor", "layers.0.*=0.5"]) == 0
    said = capsys.readouterr()
    assert "learning rate scaled (--lr-factor): decay x0.5 (" in said.out + said.err

    bad = tmp_path / "bad"
    assert train_main([*args, "--init", str(base), "--out", str(bad),
                       "--train-only", "layers.9.*"]) == 2
    err = capsys.readouterr().err
    assert "'layers.9.*' matches no parameter" in err and "newllm info --parameters" in err
    assert not list(bad.glob("**/*.safetensors"))


def test_errors_are_one_clear_line(tmp_path, corpus, capsys):
    assert eval_main([]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert train_main(["--out", str(tmp_path / "x")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert train_main(["--data", str(corpus), "--out", str(tmp_path / "y"),
                       "--model-options", "segmnt_len=8", "--cache-dir", "none"]) == 2
    assert "segmnt_len" in capsys.readouterr().err
    assert train_main(["--data", str(corpus), "--out", str(tmp_path / "z"),
                       "--preset", "tiny-infinni", "--cache-dir", "none"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert phase1_main(["--data", str(corpus), "--out", str(tmp_path / "w"),
                        "--preset", "tiny-infini", "--cache-dir", "none"]) == 2
    assert "no context block" in capsys.readouterr().err
    assert main(["bogus"]) == 2
    assert main(["--help"]) == 0


def test_eval_windows_default_to_the_training_length(tmp_path, corpus, capsys):
    """eval without --window uses the length the run trained on (recorded in its checkpoints);
    a model without memory asked for a longer window gets a warning in the report and on
    stderr."""
    out = tmp_path / "run"
    assert train_main(["--data", str(corpus), "--out", str(out), "--preset", "tiny-pythia",
                       "--steps", "1", "--batch-size", "2", "--seq-len", "48",
                       "--cache-dir", "none", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(out), "--data", str(corpus / "d1.txt")]) == 0
    ppl = last_json(capsys.readouterr().out)["perplexity"]
    assert ppl["window"] == ppl["trained_length"] == 48
    assert ppl["window_from"] == "the training length" and "warning" not in ppl
    assert eval_main(["--checkpoint", str(out), "--data", str(corpus / "d1.txt"),
                      "--window", "96"]) == 0
    captured = capsys.readouterr()
    ppl = last_json(captured.out)["perplexity"]
    assert "longer than the 48 tokens" in ppl["warning"] and "warning:" in captured.err


def test_lct_speed_explains_its_two_numbers(capsys):
    from training.cli import lct_speed_main

    assert lct_speed_main(["--seq-len", "16", "--batch-size", "2", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    report = last_json(captured.out)
    assert report["speedup"] > 0 and report["block_speedup"] > 0
    assert set(report["explain"]) == {"speedup", "block_speedup", "seeds"}
    assert "22x" in report["explain"]["seeds"]
    assert ("SLOWER" in captured.err) == (report["speedup"] < 1)  # said plainly when slower
