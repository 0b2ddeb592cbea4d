"""`Session`: the seeds' stateful convenience API on top of the stateless model.

The model itself is a function, ``model(ids, state) -> (logits, new_state)``. A session keeps one
state and advances it as text is fed::

    session = Session(model)
    logits = session.feed([17, 4, 99])          # (T, V); the memory now holds these tokens
    peek = session.feed([5], update_memory=False)  # look ahead without remembering
    session.save("chat.safetensors")            # a memory file (see `newllm.memory_file`)
    again = Session.load("chat.safetensors", model)

Everything runs under ``torch.no_grad``. States are values, so `get_memory_state` hands out the
live state without copying and nothing a caller does to the session later changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from newllm.memory_file import (
    Conversion,
    TensorMismatchError,
    load_memory_report,
    save_memory,
)
from newllm.state import ModelState


def _tokenizer_hash(tokenizer: Any) -> str | None:
    return None if tokenizer is None else getattr(tokenizer, "sha256", None)


class Session:
    """One conversation's memory over a model: feed tokens, read logits, save and restore."""

    def __init__(self, model: Any, tokenizer: Any = None, state: ModelState | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._state = model.init_state(1)
        if state is not None:
            self.set_memory_state(state)

    # state -----------------------------------------------------------------------------------
    @property
    def tokens_seen(self) -> int:
        return self._state.position

    @property
    def batch_size(self) -> int:
        return self._state.batch_size

    def reset_memory(self) -> None:
        """Forget everything: back to the empty state (position 0), same batch size."""
        self._state = self.model.init_state(self._state.batch_size)

    def get_memory_state(self) -> ModelState:
        return self._state

    def set_memory_state(self, state: ModelState) -> None:
        """Install ``state`` after checking it fits this model (names, shapes, dtype)."""
        check_state_fits(state, self.model)
        self._state = state.to(device=self.model.device)

    def memory_bytes(self) -> int:
        """Bytes of the state's tensors: what a memory file of this session carries."""
        return self._state.nbytes()

    def resident_bytes(self) -> int:
        """Bytes the live state holds in memory, spare KV-cache capacity included."""
        return self._state.resident_bytes()

    # feeding ---------------------------------------------------------------------------------
    def _as_ids(self, ids: Sequence[int] | Tensor) -> Tensor:
        if isinstance(ids, Tensor):
            t = ids.detach()
        else:
            ids = list(ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError("token ids must be ints")
            t = torch.tensor(ids, dtype=torch.long)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {t.dtype}")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"token ids must be a list, (T,) or (B, T); got shape "
                             f"{tuple(t.shape)}")
        if t.shape[0] != self._state.batch_size:
            raise ValueError(f"ids have batch {t.shape[0]} but the session's state has batch "
                             f"{self._state.batch_size}")
        vocab = self.model.config.vocab_size
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(t.min())}.."
                             f"{int(t.max())}")
        return t.to(device=self.model.device, dtype=torch.long)

    @torch.no_grad()
    def feed(self, ids: Sequence[int] | Tensor, update_memory: bool = True) -> Tensor:
        """Run ``ids`` through the model from the current state; logits (T, V).

        ``ids``: a list of ints, a (T,) or (B, T) LongTensor (B must be the state's batch size;
        for B > 1 the logits are (B, T, V)). With ``update_memory=False`` the state stays as it
        was (the tokens are seen for these logits only).
        """
        t = self._as_ids(ids)  # (B, T)
        if t.shape[1] == 0:
            B, V = t.shape[0], self.model.config.vocab_size
            logits = torch.zeros(B, 0, V, device=self.model.device, dtype=self.model.dtype)
        else:
            logits, new_state = self.model(t, self._state)  # (B, T, V)
            if update_memory:
                self._state = new_state
        return logits[0] if logits.shape[0] == 1 else logits

    def feed_text(self, text: str, update_memory: bool = True) -> Tensor:
        """`feed` the tokenizer's ids for ``text``."""
        if self.tokenizer is None:
            raise ValueError("this session has no tokenizer; pass one to Session(...) or feed ids")
        return self.feed(self.tokenizer.encode(text), update_memory=update_memory)

    # files -----------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None, *,
             metadata: dict[str, str] | None = None) -> bytes:
        """Write the memory to ``path`` (atomically) as a memory file; returns its bytes."""
        return save_memory(self._state, self.model, path,
                           tokenizer_hash=_tokenizer_hash(self.tokenizer), metadata=metadata)

    def restore(self, source: bytes | str | Path, *, max_bytes: int | None = None,
                strict: bool = False) -> Conversion | None:
        """Replace this session's memory with a memory file's; on any error nothing changes.

        A file of this checkpoint written at another precision or on another device is
        converted (returned: what was converted from), unless ``strict``, which refuses it."""
        loaded = load_memory_report(source, self.model,
                                    tokenizer_hash=_tokenizer_hash(self.tokenizer),
                                    max_bytes=max_bytes, strict=strict)
        self._state = loaded.state
        return loaded.conversion

    @classmethod
    def load(cls, source: bytes | str | Path, model: Any, tokenizer: Any = None, *,
             max_bytes: int | None = None, strict: bool = False) -> Session:
        """A session over ``model`` holding a memory file's state (fully checked first; see
        `restore` for files written at another precision)."""
        session = cls(model, tokenizer)
        session.restore(source, max_bytes=max_bytes, strict=strict)
        return session


def check_state_fits(state: ModelState, model: Any) -> None:
    """Raise `TensorMismatchError` unless ``state`` is a state this model could have made."""
    if not isinstance(state, ModelState):
        raise TypeError(f"expected a ModelState, got {type(state).__name__}")
    template = model.init_state(1)
    if len(state.layers) != len(template.layers):
        raise TensorMismatchError(f"state has {len(state.layers)} layers, the model "
                                  f"{len(template.layers)}")
    for i, (ours, theirs) in enumerate(zip(template.layers, state.layers, strict=True)):
        if type(ours) is not type(theirs):
            raise TensorMismatchError(f"layer {i} state is {type(theirs).__name__}, the model's "
                                      f"layer {i} needs {type(ours).__name__}")
    if not isinstance(state.position, int) or state.position < 0:
        raise TensorMismatchError(f"state position must be an int >= 0, got {state.position!r}")
    try:
        batch = state.batch_size
    except StopIteration:
        raise TensorMismatchError("state has no tensors") from None
    expected = model.state_shapes(batch, state.position)
    got = {n: tuple(t.shape) for n, t in state.flat_tensors().items()}
    if got != expected:
        wrong = sorted(n for n in set(got) | set(expected) if got.get(n) != expected.get(n))
        raise TensorMismatchError(
            f"state does not fit this model (config {model.config.name!r}) after "
            f"{state.position} tokens: tensors {wrong} differ (expected "
            f"{ {n: expected.get(n) for n in wrong} }, got { {n: got.get(n) for n in wrong} })"
        )
    want = model.state_dtypes()
    for name, t in state.flat_tensors().items():
        if t.dtype != want[name]:
            raise TensorMismatchError(f"state tensor {name!r} is {t.dtype}, this model's state "
                                      f"keeps it in {want[name]}")


__all__ = ["Session", "check_state_fits"]
