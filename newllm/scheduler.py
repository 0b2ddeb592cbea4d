"""`Scheduler`: who runs in each step of a continuous-batching loop.

A step is (1) up to ``prefill_chunk`` tokens of the prompts waiting to be read, oldest first
(one forward call per prompt piece, on that prompt's own `ModelState`), then (2) one decode
step over every slot that has a token to take (`Slots.step`). A prompt longer than the chunk is
read over several steps, so a long prompt delays the sessions already decoding by at most one
chunk per token they take; several short prompts share one step's chunk.

The chunk size (`PREFILL_CHUNK`, 128 tokens) comes from measurement (`benchmarks/engine.py`,
bundled model, 2-core CPU, one thread; README "Batched decoding"): reading a prompt in pieces
of 128 runs at ~86% of the throughput of the best piece size (256) while one piece costs about
as much as one decode step over 32 sessions (~23 ms), so a joining prompt at most doubles one
step of the others; pieces of 512 or more were slower per token and would stall the others for
100 ms and more. Reading in pieces gives the same logits and state as reading at once (any split
of a text does: `TransformerLM.forward`).

    sched = Scheduler(model, Slots(model, 32))
    sched.read("a", prompt_ids, state)          # queue a prompt
    done, logits = sched.step({handle: token})  # done: prompts read in full this step
    for p in done: ... slots.add(p.state), sample from p.logits ...
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from newllm.slots import Slots
from newllm.state import ModelState

PREFILL_CHUNK = 128  # prompt tokens read per step, over all waiting prompts (see above)


@dataclass
class Prompt:
    """A prompt being read: ``ids[done:]`` still to go, ``state`` after ``ids[:done]``."""

    key: Hashable
    ids: list[int]
    state: ModelState
    done: int = 0
    logits: Tensor | None = None  # (V,) after the last token read so far
    error: Exception | None = None  # the forward pass failed on this prompt


class Scheduler:
    """Prefill chunks and decode steps in one loop (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, slots: Slots,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.slots, self.prefill_chunk = model, slots, prefill_chunk
        self.waiting: deque[Prompt] = deque()

    def read(self, key: Hashable, ids: list[int], state: ModelState) -> None:
        """Queue a prompt (at least one token) to be read after ``state``."""
        if not ids:
            raise ValueError("a prompt needs at least one token")
        self.waiting.append(Prompt(key, list(ids), state))

    def cancel(self, key: Hashable) -> None:
        """Forget a queued prompt (its turn went away)."""
        self.waiting = deque(p for p in self.waiting if p.key != key)

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    @torch.no_grad()
    def prefill(self) -> list[Prompt]:
        """Read up to ``prefill_chunk`` waiting prompt tokens. Returns the prompts that are
        done: read in full (``logits`` (V,) after the last token, ``state`` after the prompt)
        or failed (``error`` set: the forward pass raised on that prompt; the others go on)."""
        budget, done = self.prefill_chunk, []
        while budget > 0 and self.waiting:
            p = self.waiting[0]
            piece = p.ids[p.done:p.done + budget]
            x = torch.tensor([piece], dtype=torch.long, device=self.model.device)  # (1, T)
            try:
                logits, p.state = self.model(x, p.state, last_only=True)  # (1, 1, V)
            except Exception as e:  # noqa: BLE001 - this prompt alone fails
                p.error = e
                done.append(self.waiting.popleft())
                continue
            p.logits, p.done, budget = logits[0, -1], p.done + len(piece), budget - len(piece)
            if p.done == len(p.ids):
                done.append(self.waiting.popleft())
        return done

    def step(self, tokens: Mapping[int, int]) -> tuple[list[Prompt], Tensor | None]:
        """One step: a prefill share, then one token for each slot in ``tokens`` (handle ->
        token). Returns the prompts done this step (see `prefill`) and the decode logits (N, V)
        in the order of ``tokens`` (None when no slot decoded)."""
        done = self.prefill()
        logits = (self.slots.step(list(tokens), list(tokens.values())) if tokens else None)
        return done, logits
