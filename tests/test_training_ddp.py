"""Two-process DistributedDataParallel on CPU (gloo) launched by torchrun: both ranks end with
the same weights, equal to one process training on both ranks' windows at once."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from newllm.tokenizer import Tokenizer
from training.config import TrainConfig
from training.lm import build_model, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while seven dogs ran far away from home".split()

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from training.config import TrainConfig
    from training.lm import train
    summary = train(TrainConfig(**json.loads(sys.argv[1])))
    with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ["RANK"]), "w") as fh:
        json.dump(summary, fh)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(data: Path, out: Path, batch_size: int) -> TrainConfig:
    return TrainConfig(data=(str(data),), out=str(out), preset="tiny-infini", steps=4,
                       batch_size=batch_size, segments=2, tbptt_segments=1, warmup_steps=0,
                       log_every=2, eval_every=0, save_every=0, cache_dir="none", lr=1e-3,
                       device="cpu")


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(16):
        (data / f"d{i}.txt").write_text(" ".join(random.Random(i).choice(WORDS)
                                                 for _ in range(50)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cfg = settings(data, tmp_path / "ddp", batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker),
         json.dumps(args), str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["fingerprint"] == r1["fingerprint"] and r0["steps"] == r1["steps"] == 4
    assert r0["tokens_seen"] == 4 * 2 * 2 * 32  # steps x ranks x batch x tokens per example
    # one process with batch 4 reads exactly the windows the two ranks read together
    torch.set_num_threads(1)
    train(settings(data, tmp_path / "one", batch_size=4))
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-4, worst  # gradients averaged across ranks = gradient of the whole batch
    fresh = build_model(cfg, Tokenizer.byte_level()).state_dict()
    moved = max(float((a[k] - fresh[k]).abs().max()) for k in a)
    assert moved > 100 * worst  # and the weights did train
    last = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert all(torch.equal(last[k], a[k]) for k in a)
