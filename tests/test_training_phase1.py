"""Phase 1 (context block by fixed-point iteration) and Lagged Cache Training."""

from __future__ import annotations

import json
import random

import pytest
import torch

from newllm import create_model
from newllm.tokenizer import Tokenizer
from training.lct import (
    ContextCache,
    LaggedContextLM,
    forward_with_contexts,
    lagged_fixed_point,
    lct_speed,
)
from training.phase1 import (
    Phase1Config,
    Phase1Loss,
    anisotropy,
    context_report,
    effective_rank,
    fixed_point,
    train_context_block,
)

WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops, one thread


def stream_ids(words: int = 80, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return torch.tensor(Tokenizer.byte_level().encode(text))


def test_phase1_converges_to_the_sequential_recurrence():
    torch.manual_seed(0)
    model = create_model("context_pythia", "tiny")
    ids = stream_ids()
    with torch.no_grad():
        emb = model.embed_in(ids)  # (N, E)
    before = {k: v.clone() for k, v in model.context_block.state_dict().items()}
    cfg = Phase1Config(batch_size=100)  # several batches: gradient accumulation
    result = train_context_block(model.context_block, emb, cfg, CPU)
    assert result["converged"] and result["iterations"] < cfg.max_iterations
    assert result["history"][-1]["convergence"] >= cfg.early_stopping_threshold
    after = model.context_block.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ctx, its = fixed_point(model.context_block, emb, cfg, CPU, max_iterations=len(ids),
                           threshold=1e-12)
    with torch.no_grad():
        exact, _ = model.context_block(emb.unsqueeze(0), model.context_block.initial(1))
    assert torch.allclose(ctx, exact[0], atol=1e-4)
    report = context_report(model.context_block, ctx, emb, CPU)
    assert report["fixed_point_vs_sequential_max_abs"] < 1e-4
    assert 1.0 < report["effective_rank"] <= model.config.context_dim
    assert not report["identity_mapping"]


def test_effective_rank_and_regularisers():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(500, 2, generator=g) @ torch.randn(2, 16, generator=g)
    full = torch.randn(500, 16, generator=g)
    assert effective_rank(low) < 2.5 < 12 < effective_rank(full) <= 16
    x = torch.randn(64, 16, generator=g, requires_grad=True)
    plain = Phase1Loss(Phase1Config(), 16)(x)
    both = Phase1Loss(Phase1Config(ema_weight=1.0, diversity_weight=1.0), 16)
    reg = both(x)
    reg.backward()
    assert torch.isfinite(reg) and reg != plain and x.grad is not None
    assert not torch.equal(both.mean, torch.zeros(16))  # EMA statistics updated


def test_isotropy_term_flattens_the_spectrum():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(4000, 16, generator=g)
    low = torch.randn(4000, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert anisotropy(full) < 0.1 < 5 < anisotropy(low) < 16
    assert anisotropy(full * 7 + 3) == pytest.approx(float(anisotropy(full)), rel=1e-4)
    # descending it raises the effective rank of skewed data
    skewed = (torch.randn(2000, 16, generator=g) * torch.logspace(0, -2, 16)).requires_grad_()
    before = effective_rank(skewed.detach())
    opt = torch.optim.Adam([skewed], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        anisotropy(skewed).backward()
        opt.step()
    assert effective_rank(skewed.detach()) > before + 3
    cfg = Phase1Config(isotropy_weight=2.0)
    x = torch.randn(64, 16, generator=g)
    assert Phase1Loss(cfg, 16)(x) == pytest.approx(
        float(Phase1Loss(Phase1Config(), 16)(x) + 2.0 * anisotropy(x)), rel=1e-5)


def test_lagged_iteration_converges_to_sequential():
    torch.manual_seed(0)
    model = create_model("context_kv", "tiny").eval()
    ids = stream_ids(8).view(1, -1)[:, :32]
    T = ids.shape[1]
    with torch.no_grad():
        exact, _ = model.context_block(model.embed_in(ids), model.context_block.initial(1))
    steps = lagged_fixed_point(model, ids, T)
    errors = [float((c - exact).abs().max()) for c in steps]
    assert errors[0] > 1e-3 and errors[9] < errors[0] and errors[-1] < 1e-5
    with torch.no_grad():
        logits, _ = model(ids)
        assert torch.allclose(forward_with_contexts(model, ids, steps[-1]), logits, atol=1e-4)


def test_lct_training_and_speed(tmp_path):
    from training.config import TrainConfig
    from training.lm import train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"d{i}.txt").write_text(" ".join(random.Random(i).choice(WORDS)
                                                 for _ in range(60)))
    out = tmp_path / "out"
    summary = train(TrainConfig(data=(str(data),), out=str(out), preset="tiny-context-pythia",
                                steps=12, batch_size=4, seq_len=32, lct=True,
                                freeze_context=False, lr=3e-3, warmup_steps=0, log_every=1,
                                eval_every=0, save_every=0, cache_dir="none"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert summary["val_loss"] is not None
    with pytest.raises(ValueError, match="--no-freeze-context"):
        train(TrainConfig(data=(str(data),), out=str(tmp_path / "o2"), preset="tiny-infini",
                          lct=True, cache_dir="none"))
    cache = ContextCache(4)
    cache.put([3], torch.ones(1, 5, 4))
    got = cache.get([3, 9], 5)
    assert got[0].eq(1).all() and got[1].eq(0).all()
    with pytest.raises(ValueError, match="context model"):
        LaggedContextLM(create_model("pythia", "tiny"))
    speed = lct_speed(create_model("context_pythia", "tiny"), seq_len=32, batch_size=2,
                      repeats=1)
    assert speed["sequential_s"] > 0 and speed["lagged_s"] > 0 and speed["block_lagged_s"] > 0
