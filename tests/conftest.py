"""Shared test fixtures: a byte-level tokenizer, tiny seeded models, a tiny checkpoint folder.

Every test starts with the global RNGs seeded (autouse `_seed`), so random inputs are the same
on every run and in any test order. Models come from the ``tiny-*`` presets (2 layers, 64 wide,
vocab 512, segments of 16, chunks of 8), built with a fixed seed that does not depend on what
ran before, in eval mode.

    def test_something(tiny_model, byte_tokenizer, tiny_checkpoint):
        model = tiny_model("infini")              # or tiny_model("tiny-infini", segment_len=8)
        ids = torch.tensor([byte_tokenizer.encode("hello")])
        folder = tiny_checkpoint                  # tmp_path/"checkpoint": tiny-infini + tokenizer
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from newllm.checkpoint import save_pretrained
from newllm.config import PRESETS, ModelConfig, config_for
from newllm.model import TransformerLM
from newllm.tokenizer import Tokenizer

MODEL_SEED = 0
# servers and engines started by tests decode eagerly (compiling takes seconds to a minute);
# tests/test_compiled.py and the compiled-engine test turn it on for themselves
os.environ.setdefault("NEWLLM_COMPILE", "0")


def need_half_kernel() -> None:
    """Skip the test where the half-weight kernel cannot run (saying why), or fail when
    ``NEWLLM_REQUIRE_SERVICES=1`` (CI's x86-64 machine with g++ must run these tests)."""
    from newllm.half_weights import kernel_problem

    problem = kernel_problem()
    if problem is not None:
        if os.environ.get("NEWLLM_REQUIRE_SERVICES") == "1":
            pytest.fail(problem + " but NEWLLM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(problem)


def need_program(name: str, package: str) -> str:
    """The path of the program ``name``; where it is missing, skip the test saying which Debian
    package brings it, or fail when ``NEWLLM_REQUIRE_SERVICES=1`` (CI: these tests must run)."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} not found (Debian package {package}; .ci/run installs it)"
        if os.environ.get("NEWLLM_REQUIRE_SERVICES") == "1":
            pytest.fail(why + " but NEWLLM_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(why)
    return path
TINY_PRESETS = sorted(name for name in PRESETS if name.startswith("tiny-"))

# model variants the batched paths are checked on: every tiny preset, and memory options
# that change how a step reads and writes its state
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{p: (p, {}) for p in TINY_PRESETS},
    "infini-banks-history-gate-floor": ("tiny-infini", {"num_memory_banks": 2,
                                                        "segments_per_bank": 1,
                                                        "memory_history": 2,
                                                        "memory_write_gate": True,
                                                        "memory_write_floor": 0.05}),
    "infini-stable-delta-mh2": ("tiny-infini", {"memory_history": 2, "memory_write_gate": True,
                                                 "memory_stable_delta": True, "memory_heads": 2}),
    "infini-linear-keyshift-mh2": ("tiny-infini", {"use_delta_rule": False,
                                                   "memory_key_shift": True, "memory_heads": 2}),
    "infini-history-noself": ("tiny-infini", {"memory_history": 2, "memory_key_self": False}),
    "mixed": ("tiny-infini", {"layers": ("infini", "multi_memory", "hierarchical", "pythia")}),
    "pythia-no-window": ("tiny-infini", {"segment_local": False}),
    "infini-attention-key-shift": ("tiny-infini", {"attention_key_shift": True}),
    "infini-pointer": ("tiny-infini", {"pointer_dim": 8, "pointer_token_keys": True,
                                       "pointer_gate_inputs": ("focus", "momentum")}),
    "infini-pointer-span": ("tiny-infini", {"pointer_dim": 8, "pointer_span": 3,
                                            "pointer_gate_inputs": ("focus", "momentum")}),
    "infini-pointer-span-delay": ("tiny-infini", {"pointer_dim": 8, "pointer_span": 2,
                                                  "pointer_delay": 4,
                                                  "pointer_gate_inputs": ("focus", "momentum")}),
    "infini-pointer-delay": ("tiny-infini", {"pointer_dim": 8, "pointer_delay": 3}),
}


def variant_model(variant: str) -> TransformerLM:
    """The tiny model of a `VARIANTS` entry, with peaked weights (greedy has no near-ties)."""
    preset, options = VARIANTS[variant]
    model = make_tiny_model(preset, init_std=0.1, **options)
    with torch.no_grad():  # weights that start at 0 (the option off) made to matter
        for name, p in model.named_parameters():
            if name.endswith("local_key_shift"):
                p.copy_(torch.linspace(-0.8, 0.8, p.numel()).view_as(p))
            if name == "pointer.mix_gate.bias":  # half the next token from the pointer
                p.zero_()
            if name in ("pointer.gate_read", "pointer.span_read"):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
            if name == "pointer.span_gate.bias":  # the span's reads a part of it too
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()))
    return model


def read_state(model: TransformerLM, n: int, seed: int) -> Any:
    """The state after ``n`` random tokens (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(torch.randint(1, 500, (1, n), generator=g))[1]


def decode_rows_like_alone(model: TransformerLM, slots: Any, handle: dict[str, int],
                           ref: dict[str, Any], late: Any, *, join: str, join_at: int,
                           leave_at: int, steps: int = 24) -> None:
    """Decode the sessions of ``handle`` (slot handles; ``ref``: their states) ``steps`` tokens
    together, rows in changing order; session ``join`` (state ``late``) joins at step
    ``join_at`` and "a" leaves at ``leave_at`` (what it takes out is its state). Every row's
    logits are what the eager model gives that session alone, and ``slots.peaks`` their
    largest magnitudes; ``ref`` ends with those states."""
    g = torch.Generator().manual_seed(5)
    for t in range(steps):
        if t == join_at:
            handle[join], ref[join] = slots.add(late), late
        if t == leave_at:
            assert_states_close(slots.remove(handle.pop("a")), ref.pop("a"))
        names = sorted(handle, reverse=t % 2 == 1)
        tokens = torch.randint(1, 500, (len(names),), generator=g)
        logits = slots.step([handle[n] for n in names], tokens)
        assert torch.equal(slots.peaks, logits.abs().amax(dim=1))  # same order as the logits
        with torch.no_grad():
            for i, n in enumerate(names):
                alone, ref[n] = model(tokens[i].view(1, 1), ref[n])
                torch.testing.assert_close(logits[i], alone[0, -1], atol=1e-5, rtol=1e-5)


def assert_states_close(a: Any, b: Any) -> None:
    """Two `ModelState`s hold the same position and tensors (fp32 rounding: 1e-5)."""
    assert a.position == b.position
    fa, fb = a.flat_tensors(), b.flat_tensors()
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].shape == fb[name].shape and fa[name].dtype == fb[name].dtype, name
        torch.testing.assert_close(fa[name], fb[name], atol=1e-5, rtol=1e-5, msg=name)


def make_tiny_model(kind: str = "pythia", seed: int = MODEL_SEED, **options: Any) -> TransformerLM:
    """A tiny model in eval mode: ``kind`` is a model kind (``infini``) or a preset name
    (``tiny-infini``); ``options`` override config fields. Same seed -> same weights, and the
    global RNG is left as it was."""
    if kind in PRESETS:
        config = ModelConfig.from_name(kind, **options)
    else:
        config = config_for(kind, "tiny", **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransformerLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (tiny models: threads only add overhead)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
    random.seed(1234)


@pytest.fixture
def byte_tokenizer() -> Tokenizer:
    """The project's byte-level tokenizer (EOS id 0, vocab 257)."""
    return Tokenizer.byte_level()


@pytest.fixture
def tiny_model() -> Callable[..., TransformerLM]:
    """Factory: ``tiny_model(kind="pythia", seed=0, **options)`` -> eval-mode tiny model."""
    return make_tiny_model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, byte_tokenizer: Tokenizer) -> Path:
    """A checkpoint folder (config.json, model.safetensors, tokenizer.json) of tiny-infini."""
    return save_pretrained(make_tiny_model("tiny-infini"), tmp_path / "checkpoint",
                           byte_tokenizer)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real redis-server (AOF on) on a free loopback port for one test module, its data in a
    temp folder; skipped (or failed in CI) where redis-server is not installed."""
    from benchmarks.live import start_redis, stop_redis

    binary = need_program("redis-server", "redis-server")
    server = start_redis(tmp_path_factory.mktemp("redis"), binary=binary)
    try:
        yield server
    finally:
        stop_redis(server)
