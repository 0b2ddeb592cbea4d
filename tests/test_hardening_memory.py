"""Memory-file fuzzing in process: a few hundred seeded hostile files (scripts/fuzz_memory.py),
each refused by `load_memory` with a `MemoryFileError` naming its problem, never another
exception, without allocating what a header claims. The same files uploaded to a live server
are in test_hardening_server.py; the longer run is ``python scripts/fuzz_memory.py``."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from newllm.checkpoint import load_checkpoint
from newllm.memory_file import MemoryFileError, load_memory, save_memory

REPO = Path(__file__).resolve().parent.parent
SEED = 0
# cases that find a bug, each with a strict xfail below (remove them here when it is fixed)
KNOWN_BUGS: tuple[str, ...] = ()


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = load_script("fuzz_memory")


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    model, tokenizer = load_checkpoint("tiny-infini")
    model.eval()
    with torch.no_grad():
        reference = model(torch.arange(1, 38)[None])[1]  # (1, 37): two segments and an open one
    good = save_memory(reference, model, tokenizer_hash=tokenizer.sha256)
    cases = list(fuzz.hostile_files(good, others=fuzz.foreign_files(model.fingerprint()),
                                    seed=SEED, flips=48))
    return {"model": model, "tokenizer_hash": tokenizer.sha256, "reference": reference,
            "good": good, "cases": cases}


def test_the_generator_is_seeded_and_covers_every_kind_of_damage(setup: dict[str, Any]) -> None:
    cases = setup["cases"]
    assert len(cases) >= 300
    assert len({c.name for c in cases}) == len(cases)
    again = list(fuzz.hostile_files(setup["good"], seed=SEED, flips=48))
    assert [c.data for c in again] == [c.data for c in cases if c.category != "foreign"]
    assert {c.category for c in cases} >= {
        "framing", "truncate", "header_length", "shape", "offsets", "entry", "dtype", "values",
        "tensors", "meta", "foreign", "flip-length", "flip-header", "flip-data"}
    assert all(c.data != setup["good"] for c in cases)
    # the original loads, so every refusal below is about the damage
    assert load_memory(setup["good"], setup["model"],
                       tokenizer_hash=setup["tokenizer_hash"]).position == 37


def test_every_hostile_file_is_refused_with_a_memory_file_error(setup: dict[str, Any]) -> None:
    cases = [c for c in setup["cases"] if c.name not in KNOWN_BUGS]
    outcomes, peak, rss = fuzz.fuzz_load(cases, setup["model"], setup["reference"],
                                         tokenizer_hash=setup["tokenizer_hash"])
    failures = [f"{o.case.name}: {o.result} {o.detail}" for o in outcomes if not o.ok]
    assert not failures, "\n".join(failures)
    tally = Counter(o.result for o in outcomes)
    assert tally["refused"] >= len(cases) - 48  # only header bit flips may load (unchanged)
    # a header that claims terabytes allocates nothing: Python allocations and RSS stay small
    assert peak < 16 * 2**20, f"tracemalloc peak {peak} bytes"
    assert rss < 64 * 2**20, f"max RSS grew by {rss} bytes"


def test_a_size_limit_refuses_before_parsing(setup: dict[str, Any]) -> None:
    """With ``max_bytes`` (the server's --max-memory-bytes) every file is still refused, and a
    file over the limit is refused for its size whatever else is wrong with it."""
    limit = len(setup["good"]) - 1
    over = 0
    for case in setup["cases"]:
        if case.name in KNOWN_BUGS:
            continue
        outcome = fuzz.run_case(case, setup["model"], setup["reference"],
                                tokenizer_hash=None, max_bytes=limit)
        # "wrong-code": refused, for its size rather than the damage the case names
        assert outcome.result in ("refused", "wrong-code", "loaded-same"), \
            (case.name, outcome.result, outcome.detail)
        if len(case.data) > limit:
            over += 1
            assert outcome.detail.startswith("too_large"), (case.name, outcome.detail)
    assert over > 10


def test_deeply_nested_layer_kinds_is_a_memory_file_error(setup: dict[str, Any]) -> None:
    data = fuzz.with_meta(setup["good"], layer_kinds="[" * 10_000)
    with pytest.raises(MemoryFileError):
        load_memory(data, setup["model"])
