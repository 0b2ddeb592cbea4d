"""Phase 2: language-model training for every model kind.

Cross-entropy on windows of the token stream, AdamW with linear warmup then cosine decay,
gradient clipping, optional bf16 autocast, and:

- **Memory layers see their memory in training.** An example is ``segments`` consecutive
  segments of ``segment_len`` tokens. It is fed in chunks of ``tbptt_segments`` segments with the
  state carried from chunk to chunk and detached between them (truncated backprop through time;
  0 = backprop through the whole example). The loss of each segment position is logged
  (``seg_loss``): later segments getting lower loss than the first is the memory at work.
- **Gates get their own learning rate and no weight decay** (the memory gates
  ``...attention.gate`` and the hierarchical expansion ``expand_weight``/``expand_bias``);
  the sigmoid of every gate is logged, since gates stuck at 0.5 are the known failure.
- **Context models** keep the context block frozen by default (it is trained in Phase 1);
  unfrozen, it trains through its exact recurrence, or with ``--lct`` by Lagged Cache Training.
- **Checkpoints and exact resume.** Every ``save_every`` steps a checkpoint folder (see
  `training.train_state`); a run pointed at an ``--out`` that has checkpoints continues from the
  newest one, and because batches are a pure function of (seed, step) and the optimizer state is
  restored bit for bit, N steps straight equal N/2 steps + resume + N/2.
- **Several processes**: under torchrun the model is wrapped in DistributedDataParallel, each
  rank reads its own slice of every step's windows, rank 0 logs and saves.

Settings: `training.config.TrainConfig`; optimizer groups and schedule: `training.optim`.

Output: ``<out>/config.yaml`` (every setting of the run; ``newllm train --config`` reruns it,
see `training.run_config`), ``<out>/metrics.jsonl`` (one JSON object per logged step and per
evaluation) and the same numbers as TensorBoard curves in ``<out>/tb/`` (`training.curves`),
``<out>/checkpoints/step-N/``, and the final model in ``<out>`` itself (config.json,
model.safetensors, tokenizer.json), which ``newllm eval --checkpoint <out>`` reads.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import data as D
from training.chat_data import ChatExamples
from training.config import TrainConfig
from training.curves import TB_FOLDER, Curves
from training.distributed import Dist, barrier, init_distributed, mean_across, shutdown
from training.evaluate import has_memory
from training.optim import gate_values, lr_scale, make_optimizer
from training.train_state import (
    checkpoint_dir,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)


# model pieces ---------------------------------------------------------------------------------
def example_length(model_config: Any, cfg: TrainConfig) -> int:
    return cfg.seq_len or cfg.segments * model_config.segment_len


def chunk_length(model: nn.Module, length: int, cfg: TrainConfig) -> int:
    """Tokens per forward/backward chunk: tbptt_segments segments for memory models."""
    if cfg.tbptt_segments and has_memory(model):
        return cfg.tbptt_segments * model.config.segment_len
    return length


# one step -------------------------------------------------------------------------------------
Forward = Callable[..., tuple[Tensor, Any]]


def scores_targets(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether the loss asks the model for its targets' log-probabilities (``targets=``)
    rather than logits: a pointer model's is computed without the (B, T, V) mixture."""
    return getattr(model, "pointer", None) is not None and not cfg.lct


def forward_backward(forward: Forward, batch: Tensor, chunk_len: int, *, backward: bool = True,
                     bf16: bool = False, no_sync: Callable[[], Any] | None = None,
                     weights: Tensor | None = None, targets_only: bool = False
                     ) -> tuple[float, Tensor]:
    """Mean cross-entropy of a batch (B, L + 1), fed in chunks with the state carried.

    ``forward(input_ids, state) -> (logits, state)``, or with ``targets_only``
    ``forward(input_ids, state, targets=next_ids) -> (log p(next_ids), state)`` (see
    `TransformerLM.forward`). With ``backward`` each chunk's share of
    the loss is backpropagated as soon as it is computed and the state is detached before the
    next chunk (truncated BPTT). ``weights`` (B, L) scale each target's loss (the sum is still
    divided by B * L). Returns the loss and every target's loss (B, L), detached.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    B, L = inputs.shape
    state, total, per_tok = None, 0.0, []
    autocast = (torch.autocast(batch.device.type, dtype=torch.bfloat16) if bf16
                else nullcontext())
    for s in range(0, L, chunk_len):
        last = s + chunk_len >= L
        sync = no_sync() if (no_sync is not None and backward and not last) else nullcontext()
        with sync:
            want = targets[:, s:s + chunk_len]
            if targets_only:
                with autocast:
                    lp, state = forward(inputs[:, s:s + chunk_len], state, targets=want)
                nll = -lp.float()  # (B, t)
            else:
                with autocast:
                    logits, state = forward(inputs[:, s:s + chunk_len], state)  # (B, t, V)
                nll = F.cross_entropy(logits.float().flatten(0, 1), want.flatten(),
                                      reduction="none").view(B, -1)  # (B, t)
            w = nll if weights is None else nll * weights[:, s:s + chunk_len]
            loss = w.sum() / (B * L)
            if backward:
                loss.backward()
        total += float(loss.detach())
        per_tok.append(nll.detach())
        if state is not None and not last:
            state = state.detach()
    return total, torch.cat(per_tok, dim=1)


def segment_losses(per_tok: Tensor, segment_len: int) -> list[float]:
    """Mean loss of each segment position within the example; per_tok (B, L)."""
    return [round(float(c.mean()), 4) for c in per_tok.split(segment_len, dim=1)]


# the run --------------------------------------------------------------------------------------
def _log(d: Dist, msg: str) -> None:
    if d.is_main:
        print(msg, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _cache_dir(cfg: TrainConfig) -> Path | None:
    if cfg.cache_dir == "none":
        return None
    return Path(cfg.cache_dir) if cfg.cache_dir else D.default_cache_dir()


def load_tokenizer(spec: str) -> Any:
    """A tokenizer.json path, a folder holding one, or '' / 'byte-level'."""
    from newllm.tokenizer import Tokenizer

    if spec in ("", "byte-level"):
        return Tokenizer.byte_level()
    p = Path(spec)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r} not found: give a tokenizer.json, a folder "
                                "holding one, or 'byte-level'")
    return Tokenizer.from_file(p)


def train_only(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Freeze every parameter whose name matches none of ``patterns`` (shell-style, matched
    against the whole name). A pattern that matches nothing is an error naming it, so a typo
    cannot silently freeze the whole model."""
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"--train-only {pattern!r} matches no parameter (names look like "
                             f"{', '.join(list(params)[:3])}; `newllm info --parameters` "
                             "lists them)")
        chosen.update(matched)
    for name, p in params.items():
        p.requires_grad_(p.requires_grad and name in chosen)
    if not any(p.requires_grad for p in params.values()):
        raise ValueError(f"--train-only {' '.join(patterns)} leaves nothing to train "
                         "(what it matches is frozen by --freeze-context)")


def build_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """A fresh model from the preset with the options applied; vocabulary and EOS come from the
    tokenizer."""
    from newllm.config import ModelConfig
    from newllm.model import TransformerLM
    from training.options import parse_overrides

    overrides = {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id,
                 **parse_overrides(cfg.model_options)}
    config = ModelConfig.from_name(cfg.preset, **overrides)
    torch.manual_seed(cfg.seed)
    return TransformerLM(config)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM during training ask the run to stop after the current step,
    save a checkpoint there and say how to resume; a second signal aborts at once (no save).
    Installed only in the main thread (signal handlers live there); the previous handlers come
    back when the run ends."""

    def __init__(self) -> None:
        self.name: str | None = None  # the signal that asked to stop
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None:  # asked twice: stop now, without saving
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\n{self.name}: stopping after this step to save a checkpoint "
              "(send it again to stop at once, without saving)", file=sys.stderr, flush=True)


class Trainer:
    """Sets up a run from a `TrainConfig` and executes it (`run`)."""

    def __init__(self, cfg: TrainConfig, dist_info: Dist | None = None) -> None:
        if not cfg.out:
            raise ValueError("--out is required: the folder for checkpoints and the model")
        if not cfg.data:
            raise ValueError("--data is required: text files, folders or JSONL files")
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        found = list_checkpoints(self.out)
        if found and not cfg.resume:
            raise ValueError(f"{self.out} already holds checkpoints; pass --resume to continue "
                             "or choose another --out")
        self.resume_from = found[-1] if found else None
        self.tokenizer = self._tokenizer()
        self.model = self._model().to(self.dist.device)
        if self.model.config.has_context_block and cfg.freeze_context:
            self.model.context_block.requires_grad_(False)
        if cfg.train_only:
            train_only(self.model, cfg.train_only)
        if cfg.lct and (cfg.freeze_context or not self.model.config.has_context_block):
            raise ValueError("--lct trains the context block: use it with a context model and "
                             "--no-freeze-context")
        self._data()  # after the checks above: a wrong setting fails before the data is read
        self.optimizer = make_optimizer(self.model, cfg)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if self.resume_from is not None:
            info = load_training_checkpoint(self.resume_from, self.model, self.optimizer)
            self.step, self.tokens_seen = int(info["step"]), int(info["tokens_seen"])
            self.elapsed = float(info.get("elapsed_s", 0.0))
            _log(self.dist, f"resuming from {self.resume_from} (step {self.step})")
        self.net: nn.Module = self.model
        self.curves: Curves | None = None  # opened by run()
        self.recall = (D.RecallExamples(self.tokenizer, self.model.config.segment_len,
                                        cfg.recall_at_start, cfg.recall_words)
                       if cfg.recall_fraction else None)
        self.chat = (ChatExamples(self.tokenizer, cfg.chat_at_start,
                                  acks=cfg.chat_acks, pack=cfg.chat_pack)
                     if cfg.chat_fraction else None)
        if cfg.lct:
            from training.lct import ContextCache, LaggedContextLM

            self.net = LaggedContextLM(self.model)
            self.context_cache = ContextCache(self.model.config.context_dim)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.net = DDP(self.net, device_ids=ids)

    # setup ------------------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        cfg = self.cfg
        if self.resume_from is not None:
            return load_tokenizer(str(self.resume_from))
        if cfg.init and not cfg.tokenizer:
            return load_tokenizer(cfg.init)
        if cfg.tokenizer_vocab:
            path = self.out / "tokenizer.json"
            if self.dist.is_main and not path.is_file():
                from training.tokenizer_train import train_tokenizer

                docs = D.read_documents(cfg.data)
                held = set(D.val_document_indices(len(docs), 0.0 if cfg.val_data
                                                  else cfg.val_fraction, cfg.seed))
                _log(self.dist, f"training a {cfg.tokenizer_vocab}-token BPE on "
                                f"{len(docs) - len(held)} documents")
                train_tokenizer((t for i, (_, t) in enumerate(docs) if i not in held),
                                cfg.tokenizer_vocab, path=path)
            barrier(self.dist)
            return load_tokenizer(str(path))
        return load_tokenizer(cfg.tokenizer)

    def _model(self) -> nn.Module:
        cfg = self.cfg
        if cfg.init:
            from newllm.checkpoint import init_from_pythia, load_checkpoint
            from training.options import parse_overrides

            # float32 master weights whatever the checkpoint stores (bf16 runs use autocast)
            model, _ = load_checkpoint(cfg.init, device="cpu", dtype=torch.float32)
            if cfg.model_options:  # a changed model: copy every tensor whose name and shape match
                config = model.config.replace(**parse_overrides(cfg.model_options))
                torch.manual_seed(cfg.seed)
                model = init_from_pythia(config, model)
        else:
            model = build_model(cfg, self.tokenizer)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model"
                             f" only {model.config.vocab_size}")
        return model

    def _data(self) -> None:
        cfg, d = self.cfg, self.dist
        cache = _cache_dir(cfg)
        if not d.is_main:
            barrier(d)  # rank 0 tokenizes (and fills the cache) first
        stream = D.load_token_stream(cfg.data, self.tokenizer, cache)
        if cfg.val_data:
            train, val = stream, D.load_token_stream(cfg.val_data, self.tokenizer, cache)
        else:
            train, val = D.split_train_val(stream, cfg.val_fraction, cfg.seed)
        if d.is_main:
            barrier(d)
        self.length = example_length(self.model.config, cfg)
        self.train_windows = D.Windows(train.tokens, self.length)
        self.val_windows = D.Windows(val.tokens, self.length)
        self.chunk = chunk_length(self.model, self.length, cfg)
        D.batch_indices(len(self.train_windows), cfg.batch_size, 0, seed=cfg.seed,
                        world_size=d.world_size)  # fails early with a clear message
        _log(d, f"data: {train.num_documents} train documents, {len(train):,} tokens, "
                f"{len(self.train_windows):,} windows of {self.length}; "
                f"validation {len(val):,} tokens, {len(self.val_windows):,} windows")

    # steps ------------------------------------------------------------------------------------
    def _forward(self, indices: list[int]) -> Forward:
        if not self.cfg.lct:
            return lambda x, state, **kw: self.net(x, state, **kw)

        def lagged(x: Tensor, state: Any) -> tuple[Tensor, Any]:
            prev = self.context_cache.get(indices, x.shape[1], x.device)
            logits, contexts = self.net(x, prev)
            self.context_cache.put(indices, contexts)
            return logits, None
        return lagged

    def make_batch(self, step: int) -> tuple[list[int], Tensor, Tensor | None, Tensor | None,
                                             Tensor | None]:
        """(window indices, batch (B, L + 1), loss weights (B, L) or None, recall answer mask
        (pass-key and chat answers) or None, copied-span mask or None) of this rank at
        ``step``: a pure function of (seed, step, rank)."""
        cfg = self.cfg
        idx = D.batch_indices(len(self.train_windows), cfg.batch_size, step, seed=cfg.seed,
                              rank=self.dist.rank, world_size=self.dist.world_size)
        batch = self.train_windows.batch(idx)
        if self.recall is None and not cfg.repeat_fraction and self.chat is None:
            return idx, batch, None, None, None
        rng = random.Random(f"recall-{cfg.seed}-{step}-{self.dist.rank}")
        mask = torch.zeros(batch.shape[0], batch.shape[1] - 1, dtype=torch.bool)
        copied = torch.zeros_like(mask)
        for i in range(batch.shape[0]):
            r = rng.random()
            if self.recall is not None and r < cfg.recall_fraction:
                batch[i], mask[i], _ = self.recall.make(batch[i], rng)
            elif r < cfg.recall_fraction + cfg.repeat_fraction:
                local = cfg.repeat_local > 0 and rng.random() < cfg.repeat_local
                span = min(cfg.repeat_span, self.model.config.segment_len // 2) if local \
                    else cfg.repeat_span
                scramble = cfg.repeat_scramble > 0 and rng.random() < cfg.repeat_scramble
                batch[i], copied[i] = D.repeat_span(batch[i], self.model.config.segment_len,
                                                    span, rng, local=local, scramble=scramble,
                                                    eos=self.tokenizer.eos_token_id)
            elif self.chat is not None and r < (cfg.recall_fraction + cfg.repeat_fraction
                                                + cfg.chat_fraction):
                batch[i], mask[i], _ = self.chat.make(batch[i], rng)
        weights = 1.0 + (cfg.recall_weight - 1.0) * (mask | copied).float()
        return idx, batch, weights, mask, copied

    def train_step(self, step: int) -> tuple[float, Tensor, float, float | None, float | None]:
        """One optimizer step: (loss, every target's loss (B, L), gradient norm, mean loss of
        recall answers or None, mean loss of copied-span tokens or None)."""
        cfg = self.cfg
        scale = lr_scale(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        idx, batch, weights, mask, copied = self.make_batch(step)
        dev = self.dist.device
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.net, "no_sync", None)
        loss, per_tok = forward_backward(
            self._forward(idx), batch.to(dev), self.chunk, bf16=cfg.bf16, no_sync=no_sync,
            weights=None if weights is None else weights.to(dev),
            targets_only=scores_targets(self.model, cfg))
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0
                                              else float("inf")))
        self.optimizer.step()
        recall = (float(per_tok[mask.to(per_tok.device)].mean())
                  if mask is not None and mask.any() else None)
        copy = (float(per_tok[copied.to(per_tok.device)].mean())
                if copied is not None and copied.any() else None)
        return loss, per_tok, norm, recall, copy

    @torch.no_grad()
    def evaluate(self, reset_memory: bool = False) -> float | None:
        """Mean validation loss over a fixed, evenly spread set of windows; with
        ``reset_memory`` every segment starts from an empty state (a segment-local model)."""
        n = len(self.val_windows)
        if n == 0:
            return None
        want = min(n, self.cfg.eval_batches * self.cfg.batch_size)
        picks = sorted({int(i * n / want) for i in range(want)})
        self.model.eval()
        total = 0.0
        bs = self.cfg.batch_size
        chunk = self.model.config.segment_len if reset_memory else self.chunk
        for s in range(0, len(picks), bs):
            batch = self.val_windows.batch(picks[s:s + bs]).to(self.dist.device)
            loss, _ = forward_backward(
                lambda x, st, **kw: self.model(x, None if reset_memory else st, **kw), batch,
                chunk, backward=False, bf16=self.cfg.bf16,
                targets_only=scores_targets(self.model, self.cfg))
            total += loss * batch.shape[0]
        return total / len(picks)

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        info = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                "train_config": dataclasses.asdict(self.cfg), "world_size": self.dist.world_size,
                "example_length": self.length}
        folder = save_training_checkpoint(checkpoint_dir(self.out, self.step), self.model,
                                          self.tokenizer, self.optimizer, info)
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return folder

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with (self.out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.curves is not None:
                self.curves.add(record)

    def _write_run_config(self, tokens_per_step: int) -> None:
        """``<out>/config.yaml``: every setting, so that ``--config`` reruns this run."""
        if not self.dist.is_main:
            return
        from training.run_config import write_run_config

        c = self.model.config
        write_run_config(self.cfg, self.out, [
            f"newllm train settings, written {time.strftime('%Y-%m-%d %H:%M:%S')} "
            "(the model's own config is config.json)",
            f"model {c.name!r}, {self.model.num_parameters():,} parameters; examples of "
            f"{self.length} tokens, {tokens_per_step:,} tokens per step",
            "rerun: newllm train --config THIS_FILE --out NEW_FOLDER (without --out it "
            "continues this run from its newest checkpoint)"])

    def _trim_metrics(self) -> None:
        """After a resume, drop log lines of steps the resumed run will redo."""
        path = self.out / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def run(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dist
        self._trim_metrics()
        seg_len = self.model.config.segment_len if has_memory(self.model) else self.length
        self.last_loss = float("nan")
        tokens_per_step = cfg.batch_size * self.length * d.world_size
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
        self._write_run_config(tokens_per_step)
        self._banner(tokens_per_step, end)
        self.curves = Curves(self.out / TB_FOLDER, self.step + 1, cfg.tensorboard and d.is_main,
                             lambda msg: _log(d, msg))
        started = time.perf_counter()
        try:
            return self._run(end, tokens_per_step, seg_len, started)
        finally:
            self.curves.close()

    def _run(self, end: int, tokens_per_step: int, seg_len: int,
             started: float) -> dict[str, Any]:
        cfg, d = self.cfg, self.dist
        stop = StopRequest()
        with stop:
            self._loop(stop, end, tokens_per_step, seg_len, started)
        if stop.name is not None:  # interrupted: save where it stands, say how to go on
            folder = self.save()
            barrier(d)
            _log(d, f"{stop.name} at step {self.step} of {cfg.steps}: checkpoint saved in "
                    f"{folder}; the same command again continues from it (--resume, the default)")
            return {"interrupted": stop.name, "steps": self.step,
                    "tokens_seen": self.tokens_seen, "checkpoint": str(folder),
                    "out": str(self.out), "fingerprint": self.model.fingerprint()}
        val = self._eval_and_log()
        if not list_checkpoints(self.out) or list_checkpoints(self.out)[-1] != \
                checkpoint_dir(self.out, self.step):
            self.save()
        if d.is_main:
            from newllm.checkpoint import save_pretrained

            save_pretrained(self.model, self.out, self.tokenizer)
        barrier(d)
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "loss": self.last_loss,
                "val_loss": val, "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9),
                "out": str(self.out), "fingerprint": self.model.fingerprint()}

    def _banner(self, tokens_per_step: int, end: int) -> None:
        """What this run is: the model, where its weights come from, what trains, how much."""
        cfg, m = self.cfg, self.model
        c = m.config
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        why = ""
        if cfg.preset and not cfg.init:
            from newllm.config import ModelConfig

            preset = ModelConfig.from_name(cfg.preset)
            if preset.vocab_size != c.vocab_size:
                why = (f" (the preset's vocabulary of {preset.vocab_size:,} is cut to the "
                       f"tokenizer's {c.vocab_size:,}, so fewer embedding rows)")
        source = (f"resumed from {self.resume_from}" if self.resume_from is not None
                  else f"initialised from {cfg.init}" if cfg.init
                  else f"fresh weights (seed {cfg.seed})")
        frozen = (f"only {', '.join(cfg.train_only)}" if cfg.train_only
                  else "context block frozen" if c.has_context_block and cfg.freeze_context
                  else "nothing frozen")
        _log(self.dist, f"model {c.name!r}: {m.num_parameters():,} parameters{why}, "
                        f"{trainable:,} trained ({frozen}); layers {list(c.layers)}; {source}")
        scaled = [g for g in self.optimizer.param_groups if g.get("lr_factor", 1.0) != 1.0]
        if scaled:  # --lr-factor: which parameters move at another rate
            _log(self.dist, "learning rate scaled (--lr-factor): " + ", ".join(
                f"{g['name']} ({sum(p.numel() for p in g['params']):,} parameters)"
                for g in scaled))
        _log(self.dist, f"run: {tokens_per_step:,} tokens per step, steps {self.step} to "
                        f"{end} ({(end - self.step) * tokens_per_step:,} tokens to go); "
                        f"device {self.dist.device}, {torch.get_num_threads()} threads, "
                        f"{self.dist.world_size} process(es)")

    def _loop(self, stop: StopRequest, end: int, tokens_per_step: int, seg_len: int,
              started: float) -> None:
        cfg, d = self.cfg, self.dist
        mark_t, mark_step = time.perf_counter(), self.step
        while self.step < end:
            asked = float(stop.name is not None)
            if (mean_across(d, asked) if d.enabled else asked) > 0:  # every rank stops together
                break
            if cfg.time_limit and mean_across(
                    d, float(time.perf_counter() - started > 60 * cfg.time_limit)) > 0:
                _log(d, f"time limit of {cfg.time_limit} min reached at step {self.step}")
                break
            t0 = time.perf_counter()
            loss, per_tok, norm, recall, copy = self.train_step(self.step)
            self.elapsed += time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += tokens_per_step
            if self.step % max(1, cfg.log_every) == 0 or self.step == end:
                last_loss = self.last_loss = mean_across(d, loss)
                now = time.perf_counter()
                rate = (self.step - mark_step) * tokens_per_step / max(now - mark_t, 1e-9)
                eta = (end - self.step) * tokens_per_step / max(rate, 1e-9)
                gates = gate_values(self.model)
                flat = [v for vs in gates.values() for v in vs]
                record = {"step": self.step, "loss": round(last_loss, 5),
                          "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": round(norm, 4),
                          "tokens": self.tokens_seen, "tokens_per_s": round(rate, 1),
                          "elapsed_s": round(self.elapsed, 3),
                          "seg_loss": segment_losses(per_tok, seg_len), "gates": gates}
                if recall is not None:
                    record["recall_answer_loss"] = round(recall, 4)
                if copy is not None:
                    record["copy_loss"] = round(copy, 4)
                self._write_metrics(record)
                gate_txt = f"  gate {sum(flat) / len(flat):.3f}" if flat else ""
                _log(d, f"step {self.step}/{cfg.steps}  loss {last_loss:.4f}  "
                        f"lr {record['lr']:.2e}{gate_txt}  {rate:,.0f} tok/s  "
                        f"ETA {_duration(eta)}")
                mark_t, mark_step = now, self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                self._eval_and_log()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save()

    def _eval_and_log(self) -> float | None:
        if not self.dist.is_main:
            return None
        val = self.evaluate()
        record: dict[str, Any] = {"step": self.step}
        text = f"step {self.step}"
        if val is not None:
            record.update(val_loss=round(val, 5), val_ppl=round(math.exp(min(val, 50)), 3))
            text += f"  val loss {val:.4f}  ppl {math.exp(min(val, 50)):.2f}"
            if has_memory(self.model):
                reset = self.evaluate(reset_memory=True)
                record["val_loss_memory_reset"] = round(reset, 5)
                # as newllm eval's gain_pct: 100 (1 - ppl_memory / ppl_reset)
                ratio = math.exp(min(max(val - reset, -50.0), 50.0))
                record["memory_gain_pct"] = round(100 * (1 - ratio), 3)
                text += f"  (memory reset every segment: {reset:.4f})"
        if self.cfg.eval_passkey and has_memory(self.model):
            from training.evaluate import passkey_accuracy

            acc = passkey_accuracy(self.model, self.tokenizer, (0, 1, 2), self.cfg.eval_passkey)
            record["passkey"] = acc["by_distance"]
            record["passkey_first_token"] = acc["first_token_by_distance"]
            record["passkey_answer_nll"] = acc["answer_nll_by_distance"]
            text += "  passkey " + " ".join(f"d{k}={v:.0%}" for k, v in acc["by_distance"].items())
            text += " (first digit " + " ".join(
                f"d{k}={v:.0%}" for k, v in acc["first_token_by_distance"].items()) + ")"
            if self.cfg.recall_words:  # the secret words it practises, as newllm eval's
                words = passkey_accuracy(self.model, self.tokenizer, (0, 1, 2),
                                         self.cfg.eval_passkey, words=True)
                record["passkey_words"] = words["by_distance"]
                record["passkey_words_answer_nll"] = words["answer_nll_by_distance"]
                text += "  words " + " ".join(f"d{k}={v:.0%}"
                                              for k, v in words["by_distance"].items())
        if self.cfg.eval_chat:
            from training.chat_eval import chat_recall

            self.model.eval()
            chat = chat_recall(self.model, self.tokenizer, self._chat_words(),
                               self.cfg.eval_chat, floor=False)
            record["chat_recall"] = chat["recall"]
            record["chat_recall_by_kind"] = {k: v["recall"] for k, v in chat["by_kind"].items()}
            text += f"  chat recall {chat['recall']:.0%} (" + " ".join(
                f"{k} {v['recall']:.0%}" for k, v in chat["by_kind"].items()) + ")"
        if len(record) > 1:
            self._write_metrics(record)
            _log(self.dist, text)
        return val

    def _chat_words(self) -> list[str]:
        """Prose for the user messages of `--eval-chat`: the validation text (else training)."""
        windows = self.val_windows if len(self.val_windows) else self.train_windows
        ids = [int(t) for t in windows.tokens[:100_000] if int(t) != self.tokenizer.eos_token_id]
        return self.tokenizer.decode(ids).split()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run Phase 2 training as configured; returns a summary (steps, loss, val_loss, tokens/s)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.dist)
