"""Lagged Cache Training (LCT) for the context block's recurrence.

The context block is recurrent: context_t depends on context_{t-1}, so training it end to end
through `ContextBlock.forward` is a Python loop over every token. LCT breaks the loop: each
example keeps the contexts its previous training step produced (the cache); this step feeds them,
shifted by one position and detached, as the recurrent inputs, so all positions run in one
parallel pass (`ContextBlock.iterate`); the new contexts then replace the cache. Every visit of
an example is one more fixed-point iteration, so the cached contexts approach the true recurrence
while the weights move slowly.

- `forward_with_contexts`: the model's forward with the contexts given (a fresh state).
- `LaggedContextLM`: the module the trainer (and DDP) wraps: (ids, cached contexts) -> (logits,
  new contexts).
- `ContextCache`: per-example cache, kept on the CPU. It is not part of a checkpoint: after a
  resume it refills from zeros, so an LCT run does not resume bit for bit.
- `lct_speed`: time one training step at a sequence length, sequential vs lagged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.layers.common import Step


def forward_with_contexts(model: nn.Module, input_ids: Tensor, contexts: Tensor) -> Tensor:
    """``model(input_ids)`` from an empty state but with the context vectors given.

    input_ids (B, T), contexts (B, T, context_dim) -> logits (B, T, V). Equal to the model's
    own forward when ``contexts`` are the block's exact recurrence.
    """
    B = input_ids.shape[0]
    x = model.embed_in(input_ids)  # (B, T, hidden)
    if model.config.context_mode == "input":
        x = contexts
    state = model.init_state(B)
    step = Step(position=0, contexts=contexts)
    for block, layer_state in zip(model.layers, state.layers, strict=True):
        x, _ = block(x, layer_state, step)
    return model.embed_out(model.final_layer_norm(x))


class LaggedContextLM(nn.Module):
    """A context model run with lagged contexts: one parallel pass per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "context_block", None) is None:
            raise ValueError("Lagged Cache Training needs a context model "
                             "(context_pythia or context_kv); this model has no context block")
        self.model = model

    def forward(self, input_ids: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids (B, T), prev (B, T, Cc) cached contexts -> logits (B, T, V), contexts."""
        emb = self.model.embed_in(input_ids)  # (B, T, hidden)
        contexts = self.model.context_block.iterate(emb, prev.detach())  # (B, T, Cc)
        return forward_with_contexts(self.model, input_ids, contexts), contexts


class ContextCache:
    """The last contexts computed for each example (zeros before its first visit), on CPU."""

    def __init__(self, context_dim: int, dtype: torch.dtype = torch.float32) -> None:
        self.context_dim, self.dtype = context_dim, dtype
        self._store: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, keys: Sequence[int], length: int, device: Any = None) -> Tensor:
        """(B, length, Cc) float32 on ``device``."""
        rows = [self._store.get(int(k)) for k in keys]
        out = torch.zeros(len(rows), length, self.context_dim)
        for i, r in enumerate(rows):
            if r is not None:
                out[i] = r.float()
        return out.to(device)

    def put(self, keys: Sequence[int], contexts: Tensor) -> None:
        for k, c in zip(keys, contexts.detach().to("cpu", self.dtype), strict=True):
            self._store[int(k)] = c.clone()


@torch.no_grad()
def lagged_fixed_point(model: nn.Module, input_ids: Tensor, iterations: int) -> list[Tensor]:
    """The contexts after 1..``iterations`` lagged steps of a fixed model (from zeros)."""
    emb = model.embed_in(input_ids)
    prev = torch.zeros(*input_ids.shape, model.config.context_dim, dtype=emb.dtype)
    out = []
    for _ in range(iterations):
        prev = model.context_block.iterate(emb, prev)
        out.append(prev)
    return out


def lct_speed(model: nn.Module, seq_len: int = 128, batch_size: int = 8,
              repeats: int = 3) -> dict[str, float]:
    """Seconds per training step (forward + backward) at ``seq_len``: the exact sequential
    recurrence through `ContextBlock.forward` against one lagged parallel pass, for the whole
    model and for the context block alone (``block_*``). The best of ``repeats`` runs each;
    weights are not changed."""
    lagged = LaggedContextLM(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    prev = torch.zeros(batch_size, seq_len, model.config.context_dim)

    def seq_step() -> None:
        logits, _ = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

    def lag_step() -> None:
        logits, _ = lagged(x, prev)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        return min(times)

    block = model.context_block

    def block_seq() -> None:  # the context block alone: exact recurrence
        contexts, _ = block(model.embed_in(x), block.initial(batch_size))
        contexts.pow(2).mean().backward()

    def block_lag() -> None:  # the context block alone: one lagged parallel pass
        block.iterate(model.embed_in(x), prev).pow(2).mean().backward()

    s, lag = best(seq_step), best(lag_step)
    bs, bl = best(block_seq), best(block_lag)
    return {"seq_len": seq_len, "batch_size": batch_size, "sequential_s": s, "lagged_s": lag,
            "speedup": s / lag, "block_sequential_s": bs, "block_lagged_s": bl,
            "block_speedup": bs / bl}
