"""Measure whether memory writes expand the memory: the toy's training, or random keys.

A delta write is linear in the memory: M' = (I − G) M + σ(K)ᵀ V with
G = Σ_t σ(k_t)ᵀ σ(k_t) / (σ(k_t)·z) (see `newllm.layers.memory`). An eigenvalue of G above 2
makes |1 − λ| > 1: the write multiplies part of M. This script records, for every memory write
(batch and memory heads pooled): λmax(G), the spectral radius of I − G, the step η of
``memory_stable_delta``, the smallest σ(k)·z (``min_c``; float32's normal range ends at
1.2e-38), max|M| and max|z| after the write.

    python scripts/memory_stability.py toy --gap 16 --seed 1 --common 0 --steps 2000 \\
        --model-options memory_history=3 memory_write_gate=true memory_heads=4
    python scripts/memory_stability.py toy ... --save-failure /tmp/step.pt  # for a post-mortem
    python scripts/memory_stability.py random --writes 2000

``toy`` trains exactly as `scripts/recall_toy.py` (same batches, same curve), and every
``--probe-every`` steps runs the step's batch once more without gradients, measuring each
write; the last probes before a non-finite loss or gradient say what the memory did.
``random`` writes segments of random or adversarial keys with each rule (linear, delta, delta
with the bounded step) and records max|M|. `memory_write` is wrapped while a probe runs, so
every memory layer's writes are measured.
Single-threaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

import newllm.layers.memory as memory
from newllm.layers.memory import delta_step, elu1, memory_write

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall_toy  # noqa: E402  (the toy's trials, model and training step)


def write_stats(sk: Tensor, z: Tensor, M_new: Tensor, z_new: Tensor) -> dict[str, float]:
    """One segment write's measurements, maxima over the batch and memory heads."""
    c = sk @ z.unsqueeze(-1)  # (..., S, 1)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    w = torch.where(c > 0, 1.0 / safe, torch.zeros_like(c))
    G = (sk * w).transpose(-1, -2) @ sk  # (..., dk, dk)
    lam = torch.linalg.eigvalsh(G.double())  # (..., dk) ascending
    return {"lambda_max": float(lam[..., -1].max()),
            "radius": float((1 - lam).abs().amax(-1).max()),  # spectral radius of I − G
            "eta": float(delta_step(sk, z).min()),
            "min_c": float(c[c > 0].min()) if bool((c > 0).any()) else 0.0,
            "max_M": float(M_new.abs().max()), "max_z": float(z_new.abs().max())}


@contextmanager
def recording(log: list[dict[str, float]]) -> Iterator[None]:
    """Record `write_stats` for every memory write while the block runs."""
    plain = memory.memory_write

    def measured(sk: Tensor, v: Tensor, M: Tensor, z: Tensor, delta: bool,
                 bound: bool = False, rk: Tensor | None = None) -> tuple[Tensor, Tensor]:
        M_new, z_new = plain(sk, v, M, z, delta, bound, rk)
        log.append(write_stats(sk, z, M_new, z_new))
        return M_new, z_new

    memory.memory_write = measured  # type: ignore[assignment]
    try:
        yield
    finally:
        memory.memory_write = plain  # type: ignore[assignment]


def summary(writes: list[dict[str, float]]) -> dict[str, object]:
    """One probe: per write max|M| and λmax(G), and the worst of each."""
    return {"max_M": [round(w["max_M"], 4) for w in writes],
            "lambda_max": [round(w["lambda_max"], 4) for w in writes],
            "worst_radius": max(w["radius"] for w in writes),
            "min_eta": min(w["eta"] for w in writes),
            "min_c": min(w["min_c"] for w in writes if w["min_c"] > 0)
            if any(w["min_c"] > 0 for w in writes) else 0.0}


def run_toy(args: argparse.Namespace) -> dict[str, object]:
    model, opt, kw, train_gen, eval_gen = recall_toy.setup(args)
    curve: list[dict[str, object]] = []
    probes: list[dict[str, object]] = []
    losses: list[tuple[int, float, float]] = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        seq = recall_toy.trials(args.batch_size, gen=train_gen, **kw)
        if step % args.probe_every == 0 or step == 1:
            writes: list[dict[str, float]] = []
            with recording(writes), torch.no_grad():
                model(seq[:, :-1])
            probes.append({"step": step, **summary(writes)})
        loss, norm = recall_toy.train_step(model, opt, seq, args.answer)
        losses.append((step, round(loss, 4), round(norm, 4)))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            writes = []
            with recording(writes), torch.no_grad():  # the failing step, measured
                model(seq[:, :-1])
            probes.append({"step": step, **summary(writes)})
            curve.append({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": True})
            if args.save_failure is not None:  # the weights (not updated) and the batch
                torch.save({"model": model.state_dict(), "seq": seq,
                            "options": args.model_options}, args.save_failure)
            print(json.dumps(curve[-1]), flush=True)
            break
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, **recall_toy.evaluate(model, recall_toy.trials(
                256, gen=eval_gen, **kw), args.answer), "seconds": round(time.time() - t0, 1),
                "worst_radius": probes[-1]["worst_radius"],
                "max_M": max(probes[-1]["max_M"])}  # type: ignore[type-var]
            curve.append(row)
            print(json.dumps(row), flush=True)
    return {"curve": curve, "probes": probes, "loss_and_grad_norm": losses}


def random_keys(kind: str, S: int, dk: int, gen: torch.Generator) -> Tensor:
    """One segment's key features (S, dk).

    ``gaussian``: σ(k) of standard normal keys. ``sparse``: keys far negative except one large
    entry, so σ(k) is nearly one-hot with ~e^-12 elsewhere. ``gated``: gaussian times one
    write strength per segment, log-uniform over 12 orders of magnitude (a gate that writes
    filler weakly and some segments strongly)."""
    k = torch.randn(S, dk, generator=gen, dtype=torch.float64)
    if kind == "sparse":
        k = k - 12.0
        k[torch.arange(S), torch.randint(0, dk, (S,), generator=gen)] += 14.0
    sk = elu1(k)
    if kind == "gated":
        sk = sk * 10.0 ** (-12.0 * torch.rand((), generator=gen, dtype=torch.float64))
    return sk


def run_random(args: argparse.Namespace) -> dict[str, object]:
    """Each rule on the same segments (float64). ‖M_n‖ / Σ_m ‖σ(K_m)ᵀ V_m‖ (spectral norms) is
    at most 1 for a write that never expands the memory; the worst ratio over the writes."""
    S, dk = args.segment, args.dk
    out: dict[str, object] = {}
    for kind in ("gaussian", "sparse", "gated"):
        for name, delta, bound in (("linear", False, False), ("delta", True, False),
                                   ("bounded", True, True)):
            gen = torch.Generator().manual_seed(args.seed)
            M = torch.zeros(dk, dk, dtype=torch.float64)
            z = torch.zeros(dk, dtype=torch.float64)
            budget, worst, peak = 0.0, 0.0, 0.0
            for _ in range(args.writes):
                sk = random_keys(kind, S, dk, gen)
                v = torch.randn(S, dk, generator=gen, dtype=torch.float64)
                M, z = memory_write(sk, v, M, z, delta, bound)
                budget += float(torch.linalg.matrix_norm(sk.T @ v, ord=2))
                worst = max(worst, float(torch.linalg.matrix_norm(M, ord=2)) / budget)
                peak = max(peak, float(M.abs().max()))
            out[f"{kind}/{name}"] = {"max_M": peak, "worst_ratio": worst}
            print(f"{kind:9s} {name:8s} max|M| {peak:9.3g}  worst ‖M‖/Σ‖σ(K)ᵀV‖ {worst:.3g}",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    toy = sub.add_parser("toy", parents=[recall_toy.parser()], add_help=False,
                         help="train the recall toy, measuring the writes")
    toy.add_argument("--probe-every", type=int, default=25)
    toy.add_argument("--save-failure", type=Path, default=None,
                     help="at a non-finite step, save the weights and the batch here (torch)")
    rnd = sub.add_parser("random", help="random and adversarial keys, every rule")
    rnd.add_argument("--writes", type=int, default=2000)
    rnd.add_argument("--segment", type=int, default=16)
    rnd.add_argument("--dk", type=int, default=16)
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.mode == "toy" and (args.eval_gaps or args.save or args.gap_curriculum):
        ap.error("--eval-gaps, --save and --gap-curriculum are recall_toy.py's; run it for them")
    torch.set_num_threads(1)
    run: Callable[[argparse.Namespace], dict[str, object]] = (
        run_toy if args.mode == "toy" else run_random)
    result = run(args)
    if args.out is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"settings": settings, **result}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
