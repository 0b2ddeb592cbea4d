"""One request being served (`Turn`) and each of its choices (`Task`), as the engine sees them.

A turn is opened when its session's lock is taken; its prompts are read by the scheduler, then
each choice decodes in a slot of its own until its last token; then the turn is saved and
answered. `healthy` is the check that fails a turn alone when its logits go bad.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from newllm.generation import GenerationRun, SamplingParams
from newllm.state import ModelState
from server.transcript import Transcript

MAX_LOGIT = 1e6  # |logit| beyond this (or NaN/inf) means a broken state, not a confident model


def job_width(job: dict[str, Any]) -> int:
    """Slots a job's turn needs at most: one per choice of each prompt."""
    return int(job["n"]) * (1 if job["op"] == "chat" else len(job["prompts"]))


def healthy(logits: Tensor) -> bool:
    """Finite logits (V,) of a sane size (see ``MAX_LOGIT``); NaN fails the comparison."""
    return bool(logits.detach().abs().max() <= MAX_LOGIT)


@dataclass
class Task:
    """One choice of one turn, from the end of its prompt to its last token."""

    choice: int
    run: GenerationRun
    logits: Tensor  # (V,) logits for the next token
    prompt_state: ModelState  # the state after the prompt (rebuilds memory after a stop string)
    slot: int | None = None  # its slot while it decodes (the state lives there)
    healthy: bool = True  # ``logits`` are finite and sane (see `healthy`)

    @property
    def finished(self) -> bool:
        return self.run.state is not None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.run.tokens)


@dataclass
class Turn:
    """One request being served."""

    rqid: int
    uid: str
    job: dict[str, Any]
    session_id: str | None
    transcript: Transcript
    created: bool
    prompts: list[tuple[str, list[int]]]  # (new text, its token ids) per prompt
    new_units: list[str]
    loaded: bool  # the turn continues a memory read from the session's file
    start: ModelState  # the state its prompts are read after
    params: list[SamplingParams]  # per choice of a prompt
    reading: int = 0  # prompts not yet read in full
    replies: dict[str, Any] = field(default_factory=dict)  # the session's idempotent answers
    prefix: list[int] = field(default_factory=list)  # ids read before it (prefix cache hit)
    carried: dict[str, str] = field(default_factory=dict)  # metadata its save keeps
    tasks: list[Task] = field(default_factory=list)
    failed: bool = False  # an error was sent; the turn is dropped unsaved

    @property
    def width(self) -> int:
        """Slots the turn needs at most: one per choice."""
        return job_width(self.job)

    @property
    def finished(self) -> bool:
        return not self.reading and all(t.finished for t in self.tasks)

    @property
    def wants_tokens(self) -> bool:
        return bool(self.job["want_tokens"])
