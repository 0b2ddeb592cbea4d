"""Phase 2 training: a step lowers the loss for every kind, gate groups, the schedule, truncated
backprop over segments, checkpoints and bit-identical resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from newllm import create_model
from training.config import TrainConfig
from training.lm import forward_backward, train
from training.optim import gate_values, lr_scale, make_optimizer, param_groups

KINDS = ["pythia", "infini", "multi_memory", "hierarchical", "context_pythia", "context_kv"]
WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops, one thread


def fixed_batch(vocab: int = 257, B: int = 2, L: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (B, L + 1), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_lowers_the_loss(kind):
    torch.manual_seed(0)
    model = create_model(kind, "tiny")
    cfg = TrainConfig(data=("x",), out="x", lr=3e-3, gate_lr=3e-2, warmup_steps=0)
    opt = make_optimizer(model, cfg)
    batch = fixed_batch()
    chunk = model.config.segment_len  # memory carried across 3 segments, truncated each one
    before, _ = forward_backward(lambda x, s: model(x, s), batch, chunk)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        after, _ = forward_backward(lambda x, s: model(x, s), batch, chunk, backward=False)
    assert after < before - 1e-3, (kind, before, after)


def test_gates_have_their_own_group():
    model = create_model("hierarchical", "tiny", memory_write_gate=True)
    cfg = TrainConfig(data=("x",), out="x", lr=1e-3, gate_lr=5e-2, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    gate_names = sorted(names[id(p)] for p in groups["gates"]["params"])
    assert gate_names == ["layers.0.attention.expand_bias", "layers.0.attention.expand_weight",
                          "layers.0.attention.gate", "layers.0.attention.write_gate",
                          "layers.0.attention.write_gate_bias"]
    assert groups["gates"]["weight_decay"] == 0.0 and groups["gates"]["base_lr"] == 5e-2
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    assert gate_values(model) == {"layers.0.gate": [0.5] * 4}


def test_lr_factor_moves_matching_parameters_to_scaled_groups():
    """--lr-factor: matching parameters get the rate times the factor (gates too, from
    --gate-lr), the first matching item wins, every parameter stays in exactly one group, and
    bad items are clear errors."""
    model = create_model("infini", "tiny")
    cfg = TrainConfig(data=("x",), out="x", lr=1e-3, gate_lr=1e-2,
                      lr_factor=("layers.0.*=0.25", "embed_in.*=0.5", "*=3"))
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    for g in groups.values():
        for p in g["params"]:
            name = names[id(p)]
            factor = 0.25 if name.startswith("layers.0.") else 0.5 if name.startswith(
                "embed_in.") else 3.0
            base = 1e-2 if name.endswith("attention.gate") else 1e-3
            assert g["base_lr"] == pytest.approx(base * factor), name
    assert "layers.0.attention.gate" in [names[id(p)] for p in groups["gates x0.25"]["params"]]
    assert groups["decay x0.25"]["weight_decay"] == 0.1
    assert groups["no_decay x3"]["weight_decay"] == 0.0
    opt = make_optimizer(model, cfg)
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(
        g["base_lr"] for g in groups.values())

    with pytest.raises(ValueError, match="'layers.7.*' matches no trainable parameter"):
        param_groups(model, TrainConfig(data=("x",), out="x", lr_factor=("layers.7.*=0.5",)))
    with pytest.raises(ValueError, match="'layers.0.*' matches no trainable parameter that an "
                                         "earlier item"):  # shadowed by the first item
        param_groups(model, TrainConfig(data=("x",), out="x",
                                        lr_factor=("layers.*=0.5", "layers.0.*=0.2")))
    for bad in ("layers.0.*", "layers.0.*=0", "=0.5", "layers.0.*=fast", "x=inf"):
        with pytest.raises(ValueError, match="expected PATTERN=FACTOR"):
            TrainConfig(data=("x",), out="x", lr_factor=(bad,))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(data=("x",), out="x", steps=110, warmup_steps=10, min_lr_ratio=0.1)
    s = [lr_scale(i, cfg) for i in range(110)]
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert s[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(s[10:], s[11:], strict=False))
    assert lr_scale(110, cfg) == pytest.approx(0.1)
    short = TrainConfig(data=("x",), out="x", steps=6, warmup_steps=100)
    assert lr_scale(2, short) == pytest.approx(1.0)  # warmup capped at half the run


def test_truncated_backprop_over_segments():
    torch.manual_seed(0)
    model = create_model("infini", "tiny")
    batch = fixed_batch(L=64)  # 4 segments of 16

    def grads(chunk: int) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss, per_tok = forward_backward(lambda x, s: model(x, s), batch, chunk)
        assert per_tok.shape == (2, 64)
        return loss, model.layers[0].attention.query_key_value.weight.grad.clone()

    full_loss, full_grad = grads(64)
    model.zero_grad()
    logits, _ = model(batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    assert torch.allclose(full_grad, model.layers[0].attention.query_key_value.weight.grad,
                          atol=1e-6)
    cut_loss, cut_grad = grads(16)
    assert cut_loss == pytest.approx(full_loss, abs=1e-5)  # same forward, state carried
    assert not torch.allclose(cut_grad, full_grad, atol=1e-6)  # but gradients truncated


def write_corpus(folder, n=24, seed=0):
    rng = random.Random(seed)
    folder.mkdir()
    for i in range(n):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(60)))
    return folder


def run(tmp_path, data, out, steps, **kw):
    cfg = TrainConfig(data=(str(data),), out=str(tmp_path / out), preset="tiny-infini",
                      steps=steps, batch_size=2, segments=2, tbptt_segments=1, warmup_steps=2,
                      log_every=1, eval_every=0, save_every=3, cache_dir="none", **kw)
    return train(cfg)


def losses(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_resume_is_bit_identical(tmp_path):
    data = write_corpus(tmp_path / "data")
    straight = run(tmp_path, data, "a", 6)
    half = run(tmp_path, data, "b", 6, stop_at=3)  # the schedule still spans 6 steps
    assert half["steps"] == 3
    resumed = run(tmp_path, data, "b", 6)  # continues from b/checkpoints/step-0000003
    assert resumed["fingerprint"] == straight["fingerprint"]
    assert half["fingerprint"] != straight["fingerprint"]
    la, lb = losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "b" / "metrics.jsonl")
    assert la == lb and sorted(la) == [1, 2, 3, 4, 5, 6]
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["gates"]) == {"layers.0.gate"} and len(record["seg_loss"]) == 2
    ckpt = tmp_path / "a" / "checkpoints" / "step-0000006"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "config.json",
                                                 "tokenizer.json", "trainer_state.safetensors",
                                                 "trainer_state.json"}
    with pytest.raises(ValueError, match="--resume"):
        run(tmp_path, data, "a", 8, resume=False)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="--out"):
        train(TrainConfig(data=("x",)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(TrainConfig(data=(str(tmp_path / "nope"),), out=str(tmp_path / "o"),
                          cache_dir="none"))
    data = write_corpus(tmp_path / "data", n=2)
    with pytest.raises(ValueError, match="batch-size"):
        run(tmp_path, data, "c", 2, val_fraction=0.0, seq_len=4096)


def test_recall_mixing_is_logged_and_deterministic(tmp_path):
    data = write_corpus(tmp_path / "data", n=30)
    cfg = dict(recall_fraction=0.5, recall_weight=4.0, seq_len=160, eval_passkey=2,
               eval_batches=1)
    run(tmp_path, data, "r1", 3, **cfg)
    run(tmp_path, data, "r2", 3, **cfg)
    lines = [json.loads(x) for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert any("recall_answer_loss" in r for r in lines)
    final = lines[-1]  # the evaluation at the end
    assert set(final["passkey"]) == set(final["passkey_first_token"]) == {"0", "1", "2"}
    assert all(v > 0 for v in final["passkey_answer_nll"].values())
    assert final["val_loss_memory_reset"] != final["val_loss"]
    assert "passkey_words" not in final  # secret words are measured only when practised
    assert losses(tmp_path / "r1" / "metrics.jsonl") == losses(tmp_path / "r2" / "metrics.jsonl")
    run(tmp_path, data, "w", 1, **cfg, recall_words=0.5)
    final = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(final["passkey_words"]) == set(final["passkey_words_answer_nll"]) == {"0", "1", "2"}


def test_local_copy_practice_stays_in_one_segment(tmp_path):
    from training.lm import Trainer

    data = write_corpus(tmp_path / "data", n=30)
    trainer = Trainer(TrainConfig(data=(str(data),), out=str(tmp_path / "c"), cache_dir="none",
                                  preset="tiny-infini", steps=2, batch_size=4, segments=3,
                                  repeat_fraction=1.0, repeat_local=1.0, repeat_span=12,
                                  recall_weight=2.0))
    S = trainer.model.config.segment_len
    spans = 0
    for step in range(5):
        _, batch, weights, _, copied = trainer.make_batch(step)
        for row in range(batch.shape[0]):
            where = copied[row].nonzero().flatten()
            assert len(where) == min(12, S // 2) - 1  # the span is cut to half a segment
            first, last = int(where[0]), int(where[-1]) + 1  # window positions of the copy
            assert first // S == last // S  # all of it in one segment
            assert torch.all(weights[row][where] == 2.0) and weights[row].sum() > len(where)
            spans += 1
    assert spans == 20


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    data = write_corpus(tmp_path / "data")
    stopped = run(tmp_path, data, "t", 4, time_limit=1e-9)  # stops before its first step
    assert stopped["steps"] == 0
    assert (tmp_path / "t" / "checkpoints" / "step-0000000" / "trainer_state.json").is_file()
    assert run(tmp_path, data, "t", 4)["steps"] == 4


def test_init_with_changed_options_copies_the_matching_weights(tmp_path):
    from safetensors.torch import load_file

    data = write_corpus(tmp_path / "data")
    run(tmp_path, data, "base", 2)
    cfg = TrainConfig(data=(str(data),), out=str(tmp_path / "shifted"), init=str(tmp_path / "base"),
                      model_options=("memory_key_shift=true",), steps=1, lr=1e-9, gate_lr=0.0,
                      weight_decay=0.0, batch_size=2, segments=2, warmup_steps=0, eval_every=0,
                      cache_dir="none")
    train(cfg)
    config = json.loads((tmp_path / "shifted" / "config.json").read_text())
    assert config["memory_key_shift"] is True and config["layers"] == ["infini", "pythia"]
    old = load_file(str(tmp_path / "base" / "model.safetensors"))
    new = load_file(str(tmp_path / "shifted" / "model.safetensors"))
    assert set(new) - set(old) == {"layers.0.attention.key_shift"}
    for name in ("embed_in.weight", "layers.1.mlp.dense_h_to_4h.weight"):  # moved by ~lr only
        torch.testing.assert_close(new[name], old[name], atol=1e-6, rtol=0)


def test_a_signal_saves_that_step_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, monkeypatch, capsys):
    """SIGINT during a random step: the run stops after it, saves a checkpoint there, prints
    the command that resumes it and exits 130; resuming gives the uninterrupted run's weights."""
    import os
    import signal

    from training.cli import train_main
    from training.lm import Trainer

    data = write_corpus(tmp_path / "data")
    straight = run(tmp_path, data, "a", 6)
    at = random.Random(5).randint(0, 3)  # the step during which the signal comes
    real = Trainer.train_step

    def step(self, i):
        out = real(self, i)
        if i == at:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    argv = ["--data", str(data), "--out", str(tmp_path / "b"), "--preset", "tiny-infini",
            "--steps", "6", "--batch-size", "2", "--segments", "2", "--tbptt-segments", "1",
            "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--save-every", "3",
            "--cache-dir", "none"]
    assert train_main(argv) == 130
    err = capsys.readouterr().err
    assert f"SIGINT at step {at + 1} of 6" in err and "resume with:" in err
    assert f"--out {tmp_path / 'b'}" in err and err.rstrip().endswith("--resume")
    assert (tmp_path / "b" / "checkpoints" / f"step-{at + 1:07d}").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    monkeypatch.undo()
    resumed = run(tmp_path, data, "b", 6)
    assert resumed["fingerprint"] == straight["fingerprint"]


def test_the_run_says_what_it_built(tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    run(tmp_path, data, "a", 1)
    err = capsys.readouterr().err
    assert "model 'tiny-infini':" in err and "parameters" in err and "fresh weights" in err
    assert "tokens per step" in err and "threads" in err
