"""`TransformerLM`: token embedding -> [context block] -> layers -> final LayerNorm -> LM head.

Every layer is a `Block` (norms, MLP, residual) around a token mixer from the registry in
`newllm.layers`; the block never branches on the layer type. The model is stateless: its state
is passed in and returned, ``model(input_ids, state) -> (logits, new_state)``. Module names
follow transformers' GPT-NeoX (``embed_in``, ``layers.N.attention.query_key_value``, ...), so a
Pythia checkpoint maps onto a `pythia` model by renaming.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from newllm.config import ModelConfig
from newllm.context import ContextBlock
from newllm.layers import LAYERS
from newllm.layers.common import MLP, Step
from newllm.pointer import PointerCache
from newllm.state import ModelState, state_tensors


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        C = config.layer_hidden
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.attention = LAYERS[config.layers[index]](config, index)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, state: Any, step: Step) -> tuple[Tensor, Any]:
        a, state = self.attention(self.input_layernorm(x), state, step)
        return self.mix(x, a), state

    def mix(self, x: Tensor, a: Tensor) -> Tensor:
        """The residual stream after this layer, given its input x and mixer output a."""
        if self.parallel:
            return x + a + self.mlp(self.post_attention_layernorm(x))
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.context_block = (
            ContextBlock(config.context_dim, config.hidden_size, config.context_ffn_dim,
                         config.layer_norm_eps)
            if config.has_context_block else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.layer_hidden, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.layer_hidden, config.vocab_size, bias=False)
        self.pointer = PointerCache(config) if config.pointer_dim else None
        self._fingerprint: tuple[Any, str] | None = None
        # (fingerprint of the weights as loaded, checkpoint fingerprint): see checkpoint_fingerprint
        self._checkpoint: tuple[str, str] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-NeoX init (normal std ``init_std``, zero biases); the context block keeps its own."""
        for name, module in self.named_modules():
            if name.startswith("context_block"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.pointer is not None:
            self.pointer.reset_parameters(self.config.init_std)
        if self.config.tie_word_embeddings:
            if self.config.hidden_size != self.config.layer_hidden:
                raise ValueError("tie_word_embeddings needs hidden_size == layer width")
            self.embed_out.weight = self.embed_in.weight

    def use_input_major_weights(self) -> TransformerLM:
        """Store every linear layer's weight input-major, for decoding; returns the model.

        A weight keeps its shape (out, in), values, name, state dict and fingerprint; only its
        memory order changes (a transposed view of an (in, out) tensor). ``F.linear`` then runs
        as ``x @ W_t`` on contiguous ``W_t``, which MKL's one-row product reads about twice as
        fast on the CPUs we measured (the LM head of pythia-70m: 4.7 vs 8.8 ms per token), while
        prefill GEMMs are as fast as before. Outputs agree with the default layout up to float
        rounding (a different summation order), not bit for bit, so both ends of a comparison
        should use the same layout. A tied LM head is left alone (the embedding reads rows).
        Meant for inference: training works but copies every weight gradient into this order.
        """
        from newllm.half_weights import HalfWeightLinear  # its kernel reads output-major

        with torch.no_grad():
            for m in self._matvec_linears():
                if m.weight.is_contiguous() and not isinstance(m, HalfWeightLinear):
                    m.weight.data = m.weight.data.t().contiguous().t()
        return self

    def use_half_weights(self) -> TransformerLM:
        """Keep every linear weight in float16 and compute with it in float32, for decoding on
        an x86-64 CPU (`newllm.half_weights`: half the bytes a decode step reads, through a
        small kernel built on first use); returns the model. Raises ValueError for a model
        that is not float32 on the CPU, `HalfWeightsUnavailable` where the kernel cannot run.
        A weight layout set before is replaced (the kernel reads weights output-major)."""
        from newllm.half_weights import convert

        return convert(self)

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the linear weights: float16 under `use_half_weights`, else `dtype`."""
        return torch.float16 if self.half_weights else self.dtype

    @property
    def half_weights(self) -> bool:
        """Whether the linear weights are kept in float16 (`use_half_weights`)."""
        from newllm.half_weights import HalfWeightLinear

        return any(isinstance(m, HalfWeightLinear) for m in self._matvec_linears())

    def weights_input_major(self) -> bool:
        """Whether every untied linear weight is stored input-major (see above)."""
        ws = self._matvec_weights()
        return bool(ws) and all(w.t().is_contiguous() for w in ws)

    def _matvec_weights(self) -> list[nn.Parameter]:
        """The linear weights whose memory order `use_input_major_weights` sets: all but a tied
        LM head (and degenerate 1-row or 1-column ones, contiguous either way)."""
        return [m.weight for m in self._matvec_linears()]

    def _matvec_linears(self) -> list[nn.Linear]:
        """The linear layers of `_matvec_weights`."""
        tied = self.embed_in.weight if self.config.tie_word_embeddings else None
        return [m for m in self.modules() if isinstance(m, nn.Linear)
                and m.weight is not tied and min(m.weight.shape) > 1]

    # state ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_in.weight.dtype

    def init_state(self, batch_size: int = 1) -> ModelState:
        """The empty state: nothing seen, memories empty."""
        dev, dt = self.device, self.dtype
        layers = tuple(b.attention.init_state(batch_size, dev, dt) for b in self.layers)
        ctx = (self.context_block.initial(batch_size, dev, dt)
               if self.context_block is not None else None)
        pointer = (self.pointer.init_state(batch_size, dev, dt)
                   if self.pointer is not None else None)
        return ModelState(0, layers, ctx, pointer)

    def state_shapes(self, batch_size: int, position: int) -> dict[str, tuple[int, ...]]:
        """Flat tensor name -> shape that a state after ``position`` tokens must have."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i, block in enumerate(self.layers):
            for name, shape in block.attention.state_shapes(batch_size, position).items():
                shapes[f"layers.{i}.{name}"] = shape
        if self.context_block is not None:
            shapes["context.last"] = (batch_size, self.config.context_dim)
        if self.pointer is not None:
            for name, shape in self.pointer.state_shapes(batch_size).items():
                shapes[f"pointer.{name}"] = shape
        return shapes

    def state_dtypes(self, dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
        """Flat tensor name -> dtype of a state: the model's dtype (or ``dtype``: what a copy
        of this model in that precision keeps), except memory tensors, which every memory
        layer keeps in float32."""
        dtype = dtype or self.dtype
        out: dict[str, torch.dtype] = {}
        for i, block in enumerate(self.layers):
            mixer = block.attention
            names = mixer.state_shapes(1, 0)
            dtypes = mixer.state_dtypes(dtype) if hasattr(mixer, "state_dtypes") else {}
            for name in names:
                out[f"layers.{i}.{name}"] = dtypes.get(name, dtype)
        if self.context_block is not None:
            out["context.last"] = dtype
        if self.pointer is not None:
            for name, dt in self.pointer.state_dtypes(dtype).items():
                out[f"pointer.{name}"] = dt
        return out

    # forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: ModelState | None = None, *,
                last_only: bool = False, targets: Tensor | None = None
                ) -> tuple[Tensor, ModelState]:
        """input_ids (B, T) -> logits (B, T, V) (or (B, 1, V) with ``last_only``), new state.

        With ``targets`` (B, T), the token that followed each position: the log-probability
        of each target (B, T) float32 in place of the logits, for training. A pointer model
        then scores the targets alone (`PointerCache.score_targets`), without the (B, T, V)
        mixture; for the others it is log_softmax(logits) at the targets."""
        if targets is not None and (last_only or targets.shape != input_ids.shape):
            raise ValueError("targets must have input_ids' shape "
                             f"{tuple(input_ids.shape)} (and no last_only)")
        hidden, embedded, after = self.hidden_states(input_ids, state)
        pointer = after.pointer  # the state's before this input (hidden_states leaves it)
        logits = self.embed_out(hidden[:, -1:] if last_only else hidden)
        if self.pointer is not None:
            started = torch.full((input_ids.shape[0],), after.position > input_ids.shape[1],
                                 device=hidden.device)
            if targets is not None:
                logits, _, pointer = self.pointer.score_targets(
                    hidden, embedded, input_ids, targets, logits, pointer, started)
            else:
                logits, pointer = self.pointer(hidden, embedded, input_ids, logits, pointer,
                                               started, last_only)
        elif targets is not None:
            logits = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        return logits, ModelState(after.position, after.layers, after.context, pointer)

    def hidden_states(self, input_ids: Tensor, state: ModelState | None = None
                      ) -> tuple[Tensor, Tensor, ModelState]:
        """The layers without the output head: (the final hidden states after the final
        LayerNorm (B, T, hidden), the input embeddings (B, T, hidden), the state after, its
        pointer's part not yet updated). What `forward` and a pointer trained on a frozen
        model (scripts/copy_cache.py) read."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if state is None:
            state = self.init_state(B)
        elif state.batch_size != B:
            raise ValueError(f"state has batch size {state.batch_size}, input_ids has {B}")
        x = embedded = self.embed_in(input_ids)  # (B, T, hidden)
        contexts, last = None, state.context
        if self.context_block is not None:
            contexts, last = self.context_block(x, state.context)  # (B, T, context_dim)
            if self.config.context_mode == "input":
                x = contexts
        step = Step(position=state.position, contexts=contexts)
        layer_states = []
        for block, layer_state in zip(self.layers, state.layers, strict=True):
            x, layer_state = block(x, layer_state, step)
            layer_states.append(layer_state)
        return (self.final_layer_norm(x), embedded,
                ModelState(state.position + T, tuple(layer_states), last, state.pointer))

    def decode_step(self, tokens: Tensor,
                    states: list[ModelState]) -> tuple[Tensor, list[ModelState]]:
        """One new token for each of several independent sessions (batched decoding).

        tokens (B,) and B single-row states at any positions. The embedding, MLPs and LM head
        run batched (most of the weights are read once for all sessions); each mixer runs per
        session, since sessions sit at different positions with different caches and segments.
        Returns logits (B, V) and the B new states; equal to B separate forward calls. For
        many sessions decoded together step after step, `newllm.slots.Slots` is much faster
        (every mixer batched too); this stays as a simple path over `ModelState` values.
        """
        B = tokens.shape[0]
        if len(states) != B:
            raise ValueError(f"{B} tokens but {len(states)} states")
        x = embedded = self.embed_in(tokens.view(B, 1))  # (B, 1, hidden)
        contexts, lasts = None, [s.context for s in states]
        if self.context_block is not None:
            last = torch.cat([c for c in lasts if c is not None], dim=0)
            contexts, last = self.context_block(x, last)  # (B, 1, context_dim)
            lasts = list(last.split(1, dim=0))
            if self.config.context_mode == "input":
                x = contexts
        per_layer: list[list[Any]] = []
        for li, block in enumerate(self.layers):
            h = block.input_layernorm(x)
            outs, new = [], []
            for b, s in enumerate(states):
                ctx = None if contexts is None else contexts[b:b + 1]
                a, ls = block.attention(h[b:b + 1], s.layers[li], Step(s.position, ctx))
                outs.append(a)
                new.append(ls)
            x = block.mix(x, torch.cat(outs, dim=0))
            per_layer.append(new)
        hidden = self.final_layer_norm(x)
        logits = self.embed_out(hidden)
        pointers: list[Any] = [None] * B
        if self.pointer is not None:
            names = state_tensors(states[0].pointer)
            stacked = type(states[0].pointer)(**{
                f: torch.cat([getattr(s.pointer, f) for s in states]) for f in names})
            started = torch.tensor([s.position > 0 for s in states], device=x.device)
            logits, ps = self.pointer(hidden, embedded, tokens.view(B, 1), logits, stacked,
                                      started)
            pointers = [type(ps)(**{f: t[b:b + 1] for f, t in state_tensors(ps).items()})
                        for b in range(B)]
        logits = logits[:, 0]  # (B, V)
        new_states = [
            ModelState(s.position + 1, tuple(per_layer[li][b] for li in range(len(self.layers))),
                       lasts[b], pointers[b])
            for b, s in enumerate(states)
        ]
        return logits, new_states

    # identity ------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_fingerprint(self) -> str:
        """Which checkpoint these weights are, whatever precision or device serves them.

        `checkpoint_fingerprint` of the weights as they were loaded (recorded by
        `remember_checkpoint`: `newllm.checkpoint` does it before converting a checkpoint to
        the dtype asked for, and ``model.to(...)`` keeps the record), so a bfloat16 and a
        float32 copy of one checkpoint agree. Weights changed since (training) are their own
        checkpoint: the canonical fingerprint of the current values. `fingerprint` is the
        exact in-memory copy (dtype included)."""
        if self._checkpoint is not None and self._checkpoint[0] == self.fingerprint():
            return self._checkpoint[1]
        return checkpoint_fingerprint(self.config, self.state_dict())

    def remember_checkpoint(self, fingerprint: str | None = None) -> None:
        """Record that the current weights are checkpoint ``fingerprint`` (default: their own
        canonical fingerprint), e.g. before converting them to another dtype."""
        self._checkpoint = (self.fingerprint(),
                            fingerprint or checkpoint_fingerprint(self.config, self.state_dict()))

    def _apply(self, fn: Any, recurse: bool = True) -> TransformerLM:
        """``to``/``cuda``/``half``...: the checkpoint a converted copy came from is kept."""
        known = self._checkpoint is not None and self._checkpoint[0] == self.fingerprint()
        out = super()._apply(fn, recurse)
        if known:
            assert self._checkpoint is not None
            self._checkpoint = (self.fingerprint(), self._checkpoint[1])
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the config and every weight (names, dtypes, shapes, bytes), hex.

        Cached, and recomputed when any parameter or buffer was changed in place since.
        """
        tensors = dict(self.state_dict())
        key = tuple((n, t.data_ptr(), t._version) for n, t in tensors.items())
        if self._fingerprint is not None and self._fingerprint[0] == key:
            return self._fingerprint[1]
        h = hashlib.sha256(self.config.fingerprint_json().encode())
        for name in sorted(tensors):
            t = tensors[name].detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest = h.hexdigest()
        self._fingerprint = (key, digest)
        return digest


def checkpoint_fingerprint(config: ModelConfig, tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the config and every weight as float32 (names, shapes, values), hex: the same
    for a checkpoint stored in half precision and its float32 copy (the upcast is exact)."""
    h = hashlib.sha256(b"newllm-checkpoint-1|" + config.fingerprint_json().encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
