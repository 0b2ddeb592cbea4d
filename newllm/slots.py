"""`Slots`: the batch state. Many sessions' states stacked in fixed buffers, decoded together.

A `ModelState` is one session's state as a value: what is saved, moved and branched. `Slots` is
how many sessions are computed on at once: every layer's state lives in tensors with a leading
slot dimension (memory matrices and normalisers stacked; the open segment's keys/values in fixed
(slots, H, S, D) buffers; `pythia` and Context-KV caches in padded buffers that grow when a
row needs more: doubling up to 1,024 entries, then by an eighth), plus the context block's last
context and a position per slot. How many buffer entries of a slot are valid follows from its
position, which the host knows, so a step decides lengths, segment boundaries and masks without
reading the device.

    slots = Slots(model, 32)
    a = slots.add(state_a)                # a session joins: its state is copied into a slot
    b = slots.add(state_b)                # ... at any position, of any length
    logits = slots.step([a, b], [t_a, t_b])   # (2, V): one token each, one forward for both
    state_a = slots.remove(a)             # it leaves: its state comes back out as a value
    slots.peaks                           # (2,) max |logit| of each row of the last step

`step` runs one forward over the rows: embedding, MLPs and LM head as one batch, and in every
mixer the attention over per-row lengths with masks, memory reads over the stacked memories,
and segment-boundary writes for just the rows that complete a segment (`slot_step` of each
mixer in `newllm.layers`). No per-session tensor work: the host only does O(rows) integer
bookkeeping (lengths, which rows end a segment). Busy slots are kept packed at rows
0..n-1 (a leaving session's row is filled with the last busy one), so the rows of a step are
read as views, not gathered copies. The plain reference is one `model(token, state)` call per
session; the tests hold the two together (logits within float tolerance, and states taken out
that save to memory files which continue with the same tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import types
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from newllm.layers.common import SlotStep
from newllm.state import ModelState

log = logging.getLogger("newllm")

def _tensors(buf: Any) -> list[tuple[Any, str]]:
    """(owner, name) of every tensor in a mixer's slot buffer (a dataclass, maybe with a dict)."""
    out: list[tuple[Any, str]] = []
    for f in dataclasses.fields(buf):
        value = getattr(buf, f.name)
        if isinstance(value, Tensor):
            out.append((buf, f.name))
        elif isinstance(value, dict):
            out.extend((value, k) for k in value)
    return out


def _get(owner: Any, name: str) -> Tensor:
    return owner[name] if isinstance(owner, dict) else getattr(owner, name)


def _none(*_: Any) -> None:
    return None


def slots_forward(model: Any, layers: list[Any], context: Tensor | None,
                  last_context: Tensor | None, ids: Tensor,
                  step: SlotStep, pointer: Any = None) -> tuple[Tensor, Tensor]:
    """The forward of one slot step: ids (N,) in the order of ``step.rows`` -> logits (N, V)
    and each row's largest |logit| (N,) (NaN where a logit is NaN; computed here so that the
    compiled step fuses it instead of a caller's health check costing ops of its own).

    Writes the rows' keys/values (and contexts, and the pointer's pairs: ``pointer`` is its
    slot buffer) into the slot buffers. What `Slots.step` runs, eagerly or compiled
    (`compiled_forward`; then with ``step.fixed``)."""
    N = ids.shape[0]
    x = embedded = model.embed_in(ids.view(N, 1))  # (N, 1, hidden)
    if context is not None:
        step.contexts, last = model.context_block(x, last_context)  # (N, 1, Cc)
        context[step.rows] = last
        if model.config.context_mode == "input":
            x = step.contexts
    for block, buf in zip(model.layers, layers, strict=True):
        x = block.mix(x, block.attention.slot_step(block.input_layernorm(x), buf, step))
    hidden = model.final_layer_norm(x)[:, 0]
    logits = model.embed_out(hidden)  # (N, V)
    if pointer is not None:
        logits = model.pointer.slot_step(hidden, embedded[:, 0], ids, logits, pointer, step)
    return logits, logits.abs().amax(dim=1)


COMPILE_ENV = "NEWLLM_COMPILE"
CPP_WRAPPER_ENV = "NEWLLM_CPP_WRAPPER"  # 0: inductor's Python wrapper on the CPU too
# model -> (backend (torch.compile's), C++ wrapper) -> compiled slots_forward
_COMPILED: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
_FAILED: list[str] = []  # why compiling failed (then every step runs eagerly)
_CPP_WRAPPER_FAILED: list[str] = []  # why the C++ wrapper failed (then the Python one is used)


def compile_enabled(flag: bool | None = None, default: bool = False) -> bool:
    """Whether to compile the decode step: ``NEWLLM_COMPILE=0`` turns it off whatever was
    asked (an operator's switch); otherwise ``flag`` if given, else ``NEWLLM_COMPILE=1``, else
    ``default``. Off too once compiling has failed in this process (no C++ compiler, ...)."""
    env = os.environ.get(COMPILE_ENV, "").strip().lower()
    if env in ("0", "false", "no", "off") or _FAILED:
        return False
    if flag is not None:
        return flag
    return True if env in ("1", "true", "yes", "on") else default


def cpp_wrapper(model: Any, backend: Any = "inductor") -> bool:
    """Whether inductor should wrap ``model``'s compiled step in C++ rather than Python: on
    the CPU unless ``NEWLLM_CPP_WRAPPER=0`` or it failed to compile in this process.

    The Python wrapper calls every kernel and library product of a step from Python; the C++
    one calls them from one C++ function. Measured on the bundled model (1 thread, 2-core
    CPU, the same logits bit for bit): 2.21 -> 1.98 ms per step in float32, 1.05 -> 0.92 ms
    with half weights."""
    off = os.environ.get(CPP_WRAPPER_ENV, "").strip().lower() in ("0", "false", "no", "off")
    return (backend == "inductor" and model.device.type == "cpu" and not off
            and not _CPP_WRAPPER_FAILED)


def compiled_forward(model: Any, backend: Any = "inductor", cpp: bool = False) -> Any:
    """`slots_forward` compiled with torch.compile (inductor on the CPU) for ``model``, made
    on first use; ``cpp``: with inductor's C++ wrapper (`cpp_wrapper`).

    Compiling happens on a step's first call with a new shape (rows, buffer capacities); the
    first shapes get code of their own, later ones share code with dynamic sizes (torch's
    automatic dynamic shapes), so the number of compilations stays small (see `Slots`).
    torch.compile keeps compiled code on the function's code object, whatever the backend and
    with a limit on how many versions it keeps: each model and backend gets a code object of
    its own, so none runs another's code or uses up another's versions."""
    by_backend = _COMPILED.setdefault(model, {})
    if (backend, cpp) not in by_backend:
        name = getattr(backend, "__name__", str(backend)) + ("_cpp" if cpp else "")
        code = slots_forward.__code__.replace(co_name=f"slots_forward_{name}_{id(by_backend)}")
        fn = types.FunctionType(code, slots_forward.__globals__, code.co_name)
        options = {"cpp_wrapper": True} if cpp else None
        by_backend[backend, cpp] = torch.compile(fn, backend=backend, fullgraph=True,
                                                 options=options)
    return by_backend[backend, cpp]


def _compile_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch.compile failing (not the step's own error)."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


class SlotsFull(RuntimeError):
    """Every slot is busy."""


class Slots:
    """A fixed number of slots for one model (see the module docstring)."""

    def __init__(self, model: Any, num_slots: int, *, compile: bool | None = None,
                 backend: Any = "inductor") -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.model = model
        self.num_slots = num_slots
        self.compiled = compile_enabled(compile)
        self.backend = backend
        self._cpp = cpp_wrapper(model, backend)  # the switch is read once, as NEWLLM_COMPILE
        self.compile_seconds = 0.0  # spent in steps that compiled (first use of a shape)
        self._shapes: set[tuple[Any, ...]] = set()  # step shapes already run compiled
        # the last step's largest |logit| per row, in its order (NaN if any is NaN): a
        # caller's health check reads it instead of scanning the logits again
        self.peaks: Tensor | None = None
        dev, dt = model.device, model.dtype
        self.layers = [b.attention.slot_init(num_slots, dev, dt) for b in model.layers]
        self.context = (model.context_block.initial(num_slots, dev, dt)
                        if model.context_block is not None else None)  # (slots, Cc)
        self.pointer = (model.pointer.slot_init(num_slots, dev, dt)
                        if model.pointer is not None else None)
        self.position: list[int] = []  # per busy row
        self._handles: list[int] = []  # handle of each busy row
        self._row: dict[int, int] = {}  # handle -> row
        self._next = 0

    # bookkeeping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._handles)

    def __contains__(self, handle: object) -> bool:
        return handle in self._row

    @property
    def free(self) -> int:
        return self.num_slots - len(self._handles)

    def position_of(self, handle: int) -> int:
        return self.position[self._lookup(handle)]

    def _lookup(self, handle: int) -> int:
        try:
            return self._row[handle]
        except KeyError:
            raise KeyError(f"no session in slot handle {handle}") from None

    # in and out ----------------------------------------------------------------------------
    def add(self, state: ModelState) -> int:
        """Copy a one-session state into a free slot; returns the slot's handle."""
        if state.batch_size != 1:
            raise ValueError(f"a slot takes a state of batch size 1, got {state.batch_size}")
        if not self.free:
            raise SlotsFull(f"all {self.num_slots} slots are busy")
        row = len(self._handles)
        with torch.no_grad():
            for block, buf, ls in zip(self.model.layers, self.layers, state.layers, strict=True):
                block.attention.slot_load(buf, row, ls, state.position)
            if self.context is not None:
                assert state.context is not None, "a context model's state has a context"
                self.context[row] = state.context[0]
            if self.pointer is not None:
                assert state.pointer is not None, "a pointer model's state has a pointer"
                self.model.pointer.slot_load(self.pointer, row, state.pointer)
        handle, self._next = self._next, self._next + 1
        self._handles.append(handle)
        self.position.append(state.position)
        self._row[handle] = row
        return handle

    def state(self, handle: int) -> ModelState:
        """A copy of the slot's state as a `ModelState` (the slot keeps going)."""
        row = self._lookup(handle)
        pos = self.position[row]
        layers = tuple(block.attention.slot_extract(buf, row, pos)
                       for block, buf in zip(self.model.layers, self.layers, strict=True))
        ctx = None if self.context is None else self.context[row:row + 1].clone()
        pointer = (None if self.pointer is None
                   else self.model.pointer.slot_extract(self.pointer, row))
        return ModelState(pos, layers, ctx, pointer)

    def remove(self, handle: int) -> ModelState:
        """Take a session out: its state, and its slot freed (the last busy row moves in)."""
        state = self.state(handle)
        self.discard(handle)
        return state

    def discard(self, handle: int) -> None:
        """Free a slot without reading its state."""
        row = self._lookup(handle)
        last = len(self._handles) - 1
        if row != last:  # keep busy rows packed: move the last one into the hole
            for buf in self._buffers():
                for owner, name in _tensors(buf):
                    t = _get(owner, name)
                    t[row] = t[last]
            if self.context is not None:
                self.context[row] = self.context[last]
            moved = self._handles[last]
            self._handles[row], self.position[row] = moved, self.position[last]
            self._row[moved] = row
        self._handles.pop()
        self.position.pop()
        del self._row[handle]

    # the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, handles: Sequence[int], tokens: Sequence[int] | Tensor) -> Tensor:
        """One token for each of these slots, in one forward; logits (N, V) in their order.

        A step that raises leaves every slot as it was before it, so the caller can retry the
        rows (e.g. one by one, to find the one that failed)."""
        N = len(handles)
        if N == 0:
            raise ValueError("step needs at least one slot")
        if len(set(handles)) != N:
            raise ValueError("a slot appears twice in one step")
        model = self.model
        rows = [self._lookup(h) for h in handles]
        order = sorted(range(N), key=rows.__getitem__)
        rows = [rows[i] for i in order]
        span = slice(rows[0], rows[0] + N) if rows[-1] - rows[0] == N - 1 else None
        dev = model.device
        ids = torch.as_tensor(tokens, dtype=torch.long).to(dev)
        if ids.shape != (N,):
            raise ValueError(f"{N} slots but tokens of shape {tuple(ids.shape)}")
        host = tuple(self.position[r] for r in rows)
        step = SlotStep(torch.tensor(rows, device=dev), torch.tensor(host, device=dev), host,
                        span, fixed=self.compiled)
        sorted_ids = ids if order == sorted(order) else ids[torch.tensor(order, device=dev)]
        undo = [u for block, buf in zip(model.layers, self.layers, strict=True)
                if (u := getattr(block.attention, "slot_backup", _none)(buf, step)) is not None]
        if self.pointer is not None:
            undo.append(model.pointer.slot_backup(self.pointer, step, sorted_ids))
        last_context = None if self.context is None else step.take(self.context).clone()
        try:
            if self.compiled:
                logits, peaks = self._compiled_step(sorted_ids, step, last_context)
            else:
                logits, peaks = slots_forward(model, self.layers, self.context, last_context,
                                              sorted_ids, step, self.pointer)
        except BaseException as e:  # a failed step leaves every slot as it was: it can be
            for u in undo:  # retried
                u()
            if self.context is not None:
                self.context[step.rows] = last_context
            if self.compiled and _compile_failure(e):
                why = f"{type(e).__name__}: {e}"
                too_many_shapes = "RecompileLimit" in type(e).__name__
                if self._use_cpp and not too_many_shapes:
                    _CPP_WRAPPER_FAILED.append(why)  # the Python wrapper gets its chance
                    log.warning("compiling the decode step with inductor's C++ wrapper "
                                "failed; trying its Python wrapper (%s=0 skips the C++ one): "
                                "%s", CPP_WRAPPER_ENV, why[:2000])
                    return self.step(handles, tokens)
                if too_many_shapes:  # these slots only
                    log.warning("the compiled decode step met too many shapes; these slots "
                                "decode eagerly from now on: %s", why[:2000])
                else:
                    _FAILED.append(why)
                    log.warning("compiling the decode step failed; decoding eagerly from now "
                                "on (NEWLLM_COMPILE=0 skips trying): %s", why[:2000])
                self.compiled = False
                return self.step(handles, tokens)
            raise
        for r in rows:
            self.position[r] += 1
        if order == sorted(order):
            self.peaks = peaks
            return logits
        where = torch.tensor(order, device=dev)
        out, self.peaks = torch.empty_like(logits), torch.empty_like(peaks)
        out[where], self.peaks[where] = logits, peaks
        return out

    @property
    def _use_cpp(self) -> bool:
        """Whether the compiled step is wrapped in C++ (`cpp_wrapper`; off for every `Slots`
        of the process once it failed)."""
        return self._cpp and not _CPP_WRAPPER_FAILED

    def _compiled_step(self, ids: Tensor, step: SlotStep,
                       last_context: Tensor | None) -> tuple[Tensor, Tensor]:
        """`slots_forward` compiled, over fixed-shape buffers (``step.fixed``): capacities are
        reserved before it and segment-end memory writes done after it, eagerly.

        A step whose shape (rows, span, buffer capacities) has run before skips the compiled
        code's guard checks (``skip_guard_eval_unsafe``: only the guards that tell apart code
        compiled for different shapes are evaluated), which saves a good part of a
        one-row step; a new shape runs with every guard and may compile (logged)."""
        model = self.model
        for block, buf in zip(model.layers, self.layers, strict=True):
            getattr(block.attention, "slot_reserve", _none)(buf, step)
        cpp = self._use_cpp
        shape = (ids.shape[0], None if step.span is None else step.span.start,
                 torch.is_inference_mode_enabled(), cpp,
                 tuple(_get(o, n).shape for buf in self.layers for o, n in _tensors(buf)))
        fn = compiled_forward(model, self.backend, cpp)
        args = (model, self.layers, self.context, last_context, ids, step, self.pointer)
        if shape in self._shapes:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                out = fn(*args)
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            seconds = time.perf_counter() - t0
            self._shapes.add(shape)
            self.compile_seconds += seconds
            if seconds > 0.5:
                log.info("decode step for %d row(s) compiled in %.1f s", ids.shape[0], seconds)
        for block, buf in zip(model.layers, self.layers, strict=True):
            getattr(block.attention, "slot_finish", _none)(buf, step)
        return out

    def nbytes(self) -> int:
        """Bytes of the slot buffers (spare capacity included)."""
        total = 0 if self.context is None else self.context.nbytes
        for buf in self._buffers():
            total += sum(_get(o, n).nbytes for o, n in _tensors(buf))
        return total

    def _buffers(self) -> list[Any]:
        """Every per-slot buffer: the mixers', and the pointer's when the model has one."""
        return [*self.layers, *([self.pointer] if self.pointer is not None else [])]
