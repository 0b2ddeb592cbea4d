"""Runs as files: ``newllm train --config`` and the config.yaml a run writes (a rerun from it
gives the same model), TensorBoard curves beside metrics.jsonl, ``newllm runs compare``."""

from __future__ import annotations

import dataclasses
import json
import random
import sys

import pytest
import yaml

from training.cli import runs_main, train_main
from training.config import TrainConfig

WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()
TINY = ["--batch-size", "2", "--segments", "2", "--log-every", "1", "--cache-dir", "none",
        "--eval-batches", "1", "--warmup-steps", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops, one thread


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(10):
        rng = random.Random(i)
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)))
    return folder


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, corpus, one_thread):
    """A 4-step tiny-infini run from flags, evaluated (with pass-key) at steps 2 and 4:
    (folder, its summary)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    argv = ["--data", str(corpus), "--out", str(out), "--preset", "tiny-infini", "--steps", "4",
            "--eval-every", "2", "--eval-passkey", "1", *TINY]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(argv) == 0
    return out, last_json(stdout.getvalue())


def last_json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


# config files ------------------------------------------------------------------------------------
def test_a_rerun_from_the_written_config_gives_the_same_model(run_a, tmp_path, monkeypatch,
                                                              capsys):
    a, first = run_a
    written = yaml.safe_load((a / "config.yaml").read_text())
    assert set(written) == {f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}
    assert written["steps"] == 4 and written["eval-passkey"] == 1 and written["lr"] == 1e-3
    assert written["out"] == str(a) and written["data"][0].startswith("/")  # absolute paths
    monkeypatch.chdir(tmp_path)  # another folder; --out relative to it
    assert train_main(["--config", str(a / "config.yaml"), "--out", "b"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["steps"] == 4 and again["fingerprint"] == first["fingerprint"]
    rewritten = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert rewritten == {**written, "out": str(tmp_path / "b")}
    from newllm.checkpoint import load_checkpoint

    model, _ = load_checkpoint(str(tmp_path / "b" / "checkpoints" / "step-0000004"))
    assert model.fingerprint() == first["fingerprint"]


def test_a_config_file_takes_every_flag_and_the_command_line_wins(tmp_path, corpus, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {corpus}\n"  # one string for a list flag
                   f"out: {tmp_path / 'r'}\n"
                   "preset: tiny-pythia\n"
                   "steps: 5\n"
                   "batch-size: 2\n"
                   "seq_len: 24\n"  # snake_case too
                   "lr: 1\n"  # an integer for a number
                   "model-options: {rotary_pct: 0.5}\n"
                   "cache-dir: none\n"
                   "eval_every: 0\n"
                   "tensorboard: false\n")
    assert train_main(["--config", str(cfg), "--steps", "1", "--lr", "0.002"]) == 0
    assert last_json(capsys.readouterr().out)["steps"] == 1
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["steps"] == 1 and written["lr"] == 0.002  # the flags won
    assert written["seq-len"] == 24 and written["batch-size"] == 2 and written["lr"] != 1
    assert written["model-options"] == ["rotary_pct=0.5"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["rotary_pct"] == 0.5
    assert not (tmp_path / "r" / "tb").exists()  # --no-tensorboard, from the file
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"steps": 3, "val_data": ["x.txt", "y.txt"]}))
    from training.run_config import read_run_config

    assert read_run_config(as_json, TrainConfig) == {"steps": 3, "val_data": ("x.txt", "y.txt")}


@pytest.mark.parametrize("text, says", [
    ("batch_sise: 2", ["'batch_sise'", "batch-size"]),
    ("steps: ten", ["steps must be an integer", "'ten'"]),
    ("lr: true", ["lr must be a number"]),
    ("bf16: 1", ["bf16 must be true or false"]),
    ("data: [1, 2]", ["data must be a list of strings"]),
    ("steps: 2\nsteps: 3\nbatch-size: 2\nbatch_size: 3", ["'batch_size' is given twice"]),
    ("steps: [1", ["not valid YAML", "line 4"]),
    ("steps: 0", ["--steps must be >= 1"]),
])
def test_a_bad_config_file_is_one_clear_error_and_nothing_runs(tmp_path, corpus, capsys,
                                                               text, says):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {corpus}\nout: {tmp_path / 'r'}\n{text}\n")
    assert train_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for s in says:
        assert s in err
    assert not (tmp_path / "r").exists()


def test_a_missing_or_shapeless_config_file_is_named(tmp_path, capsys):
    assert train_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' not found" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- steps: 3\n")
    assert train_main(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "must be a mapping of flag names to values, got list" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"steps": 3,}')
    assert train_main(["--config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err


# curves -------------------------------------------------------------------------------------------
def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)] \
        if tag in acc.Tags()["scalars"] else None  # float32 in the events


def test_the_curves_are_in_tensorboard(run_a):
    a, _ = run_a
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert list((a / "tb").glob("events.out.tfevents.*"))
    assert scalars(a / "tb", "loss") == losses
    vals = [(r["step"], r["val_ppl"]) for r in records if "val_ppl" in r]
    assert scalars(a / "tb", "val_ppl") == vals and [s for s, _ in vals] == [2, 4]
    assert scalars(a / "tb", "passkey/1") is not None
    assert scalars(a / "tb", "memory_gain_pct") is not None


def test_a_resumed_run_hides_the_curves_of_the_steps_it_redoes(tmp_path, corpus):
    import shutil

    out = tmp_path / "r"
    argv = ["--data", str(corpus), "--out", str(out), "--preset", "tiny-pythia", "--steps", "4",
            "--save-every", "2", "--keep-checkpoints", "0", "--eval-every", "0", *TINY]
    assert train_main(argv) == 0
    shutil.rmtree(out / "checkpoints" / "step-0000004")  # as if killed after step 4's log
    assert train_main(argv) == 0  # resumes at step 2, redoes 3 and 4
    assert [s for s, _ in scalars(out / "tb", "loss")] == [1, 2, 3, 4]


def test_without_tensorboard_a_note_and_the_run_goes_on(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "r"
    assert train_main(["--data", str(corpus), "--out", str(out), "--preset", "tiny-pythia",
                       "--steps", "1", "--eval-every", "0", *TINY]) == 0
    err = capsys.readouterr().err
    assert "tensorboard package is not installed" in err
    assert (out / "metrics.jsonl").is_file() and not (out / "tb").exists()


# compare ------------------------------------------------------------------------------------------
def test_compare_prints_a_table_and_writes_a_png(run_a, tmp_path, monkeypatch, capsys):
    a, _ = run_a
    other = tmp_path / "runs" / "pythia"  # an older-style run: no elapsed_s, no gain field
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 3.5, "tokens": 640}\n{"step": 20, "loss": 3.25, "tokens": 1280}\n'
        '{"step": 20, "val_loss": 1.0, "val_loss_memory_reset": 1.5}\n'
        '{"step": 25, "loss": NaN, "tokens": 1600}\n{"step": 30, "lo')  # diverged, then killed
    (other / "eval.json").write_text(json.dumps({"perplexity": {"ppl": 9.5},
                                                 "passkey": {"by_distance": {"0": 1, "1": 0}}}))
    monkeypatch.chdir(tmp_path)  # relative paths from another folder
    png = tmp_path / "plots" / "cmp.png"
    assert runs_main(["compare", "runs/pythia", str(a), "--out", "plots/cmp.png"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["run", "steps", "tokens"] and "eval ppl" in lines[0]
    assert "eval gain" not in lines[0]  # an eval column only where some run has the value
    pythia = next(line for line in lines if line.startswith("pythia")).split()
    a_row = next(line for line in lines if line.startswith("a ")).split()
    assert pythia[1:3] == ["25", "1,600"] and pythia[3] == "-"  # no training time known
    assert pythia[4:6] == ["nan", "3.2500"] and "2.72" in pythia  # val ppl = e^1
    assert "+39.35%" in pythia  # 100 (1 - e^1 / e^1.5)
    assert "9.50" in pythia and "50%" in pythia  # from its eval.json
    assert a_row[1:3] == ["4", "256"] and a_row[-2:] == ["-", "-"]  # no eval.json
    assert "skipped 1 line" in captured.err  # the line cut short
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert runs_main(["compare", "runs/pythia", str(a), "--json", "--out", ""]) == 0
    rows = last_json(capsys.readouterr().out)["runs"]
    assert rows[0]["memory_gain_pct"] == pytest.approx(100 * (1 - 2.718281828 / 4.48168907))
    assert rows[1]["passkey"] is not None and rows[1]["time_s"] > 0


def test_compare_refuses_a_folder_that_is_not_a_run(run_a, tmp_path, corpus, capsys):
    a, _ = run_a
    png = tmp_path / "c.png"
    assert runs_main(["compare", str(a), str(corpus), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "is not a training run: it has no metrics.jsonl" in err and str(corpus) in err
    assert runs_main(["compare", str(tmp_path / "nope"), "--out", str(png)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not png.exists()  # nothing written
    from newllm.cli import main

    assert main(["runs", "compare", str(corpus), "--out", str(png)]) == 2
    assert main(["runs", "compare", "--help"]) == 0
    assert "pass-key" in capsys.readouterr().out
