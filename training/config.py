"""`TrainConfig`: the settings of one Phase 2 run; each field is a ``newllm train`` flag (its
docstring is the flag's help, see `training.options`)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Settings of one Phase 2 run; each field is a ``newllm train`` flag."""

    data: tuple[str, ...] = ()
    """training text: .txt/.md files, folders of them, JSONL with {"text": ...} per line"""
    out: str = ""
    """output folder: checkpoints, metrics.jsonl and the final model (required)"""
    val_data: tuple[str, ...] = ()
    """validation text; if empty, --val-fraction of the training documents are held out"""
    preset: str = "tiny-infini"
    """model preset (see newllm.config.PRESETS), e.g. tiny-infini, small-infini, infini-70m"""
    model_options: tuple[str, ...] = ()
    """model config overrides KEY=VALUE (JSON values), e.g. segment_len=64 gate_init=-2"""
    init: str = ""
    """start from this checkpoint (folder or GPT-NeoX folder) instead of a fresh preset"""
    tokenizer: str = ""
    """tokenizer.json (or a folder holding one) or 'byte-level'; default: the --init
    checkpoint's tokenizer, else byte-level"""
    tokenizer_vocab: int = 0
    """if > 0, first train a byte-level BPE of this many tokens on the training documents"""
    steps: int = 1000
    """optimizer steps in total (a resumed run continues up to this)"""
    batch_size: int = 8
    """examples per step (per process)"""
    seq_len: int = 0
    """tokens per example; 0 = segments x segment_len of the model"""
    segments: int = 4
    """consecutive segments per example when --seq-len is 0"""
    tbptt_segments: int = 0
    """memory models: backprop through this many segments, the state carried and detached
    between chunks; 0 = through the whole example"""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """the cosine decays to lr x this at the last step"""
    warmup_steps: int = 100
    """linear warmup steps (at most half of --steps)"""
    weight_decay: float = 0.1
    """AdamW weight decay for matrices (never for biases, norms or gates)"""
    gate_lr: float = 1e-2
    """peak learning rate of the memory gates (same schedule, no weight decay)"""
    lr_factor: tuple[str, ...] = ()
    """PATTERN=FACTOR: multiply the learning rate (and the gates' --gate-lr) of the parameters
    whose names match the shell-style PATTERN by FACTOR, e.g. 'layers.0.*=0.2' 'embed_in.*=0.2'
    to move the layers below the memory less than the rest; the first matching item wins"""
    recall_fraction: float = 0.0
    """share of training examples turned into synthetic pass-key recall examples (a key told
    early in real prose, asked for at the end, 0 or more segments later)"""
    recall_at_start: float = 0.0
    """share of recall examples that open with EOS and the fact (a fact told at the start of a
    document or conversation), the rest placed anywhere before the question"""
    recall_words: float = 0.0
    """share of recall examples whose key is a word from the example's own prose ("The secret
    word is W.") instead of five digits: practice in carrying words, not only digits (the
    bundled model recalls no word; 1,280 such examples did not change that, training/README)"""
    recall_weight: float = 1.0
    """loss weight of the answer tokens of recall examples (and of --repeat-fraction copies)"""
    chat_fraction: float = 0.0
    """share of training examples turned into chat-form recall examples: a conversation in the
    server's chat template where the first user message tells a fact (a name, a number, a city,
    a favourite) and a later one asks for it, filler turns cut from the example's own prose
    (answers get --recall-weight; see training.chat_data)"""
    chat_at_start: float = 0.5
    """share of --chat-fraction conversations that open their example (an empty state, as a new
    server session); the rest follow prose and EOS"""
    chat_acks: float = 0.0
    """share of the replies before the question in --chat-fraction conversations that are a
    short acknowledgement ("I see.", "Go on.") instead of prose: greedy decoding then answers
    a message of prose briefly and keeps its own made-up facts out of the conversation"""
    chat_pack: bool = False
    """fill each --chat-fraction example with conversations, one after another (each after
    EOS, the state carried; --chat-at-start then does not apply), instead of one conversation
    per example: many answers per long example"""
    repeat_fraction: float = 0.0
    """share of training examples where a span of their own prose is written again one or more
    segments later (copy practice for the memory; the copied tokens get --recall-weight)"""
    repeat_span: int = 32
    """tokens per copied span of --repeat-fraction examples (at most the segment length)"""
    repeat_scramble: float = 0.0
    """share of --repeat-fraction copies whose span is first overwritten with tokens drawn at
    random from the example: unpredictable the first time, so only copying lowers the loss of
    the repeat (induction-head practice; a model that has none copies nothing, not even a word
    told a sentence earlier: `newllm eval --copy-test`)"""
    repeat_local: float = 0.0
    """share of --repeat-fraction copies that land later in their own segment (span at most
    half a segment) instead of a later segment: in-context copying practice for local attention"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0 = off)"""
    bf16: bool = False
    """bf16 autocast (about 2x faster on recent CPUs and GPUs)"""
    train_only: tuple[str, ...] = ()
    """train only the parameters whose names match one of these patterns (shell-style, e.g.
    'layers.1.attention.*'; see the names with `newllm info --parameters`), the rest frozen;
    empty = everything (less what --freeze-context keeps)"""
    freeze_context: bool = True
    """context models: keep the context block frozen (it is trained by Phase 1)"""
    lct: bool = False
    """context models with an unfrozen block: Lagged Cache Training instead of the exact
    recurrence"""
    seed: int = 42
    """seed of the model init, the data order and the train/val split"""
    val_fraction: float = 0.02
    """share of training documents held out when --val-data is not given"""
    eval_every: int = 250
    """validation loss every this many steps (0 = only at the end)"""
    eval_batches: int = 8
    """batches of validation windows per evaluation"""
    eval_passkey: int = 0
    """memory models: at each evaluation also measure pass-key recall with this many examples
    at 0, 1 and 2 segments back (0 = off)"""
    eval_chat: int = 0
    """at each evaluation also measure chat recall in this many conversations (a fact told in
    the first user message, asked in the 10th, the session moved through a memory file after
    the 5th; training.chat_eval, prose from the validation data; 0 = off)"""
    save_every: int = 500
    """checkpoint every this many steps (and at the end)"""
    keep_checkpoints: int = 3
    """keep only the newest this many checkpoints (0 = all)"""
    log_every: int = 10
    """progress line and metrics.jsonl entry every this many steps"""
    tensorboard: bool = True
    """also write every logged number as a TensorBoard curve in OUT/tb (tensorboard --logdir
    OUT/tb); without the tensorboard package, a note and no curves"""
    resume: bool = True
    """continue from the newest checkpoint in --out if there is one"""
    stop_at: int = 0
    """end this run at this step with a checkpoint, though the schedule spans --steps; run the
    same command again to continue (0 = run to --steps)"""
    time_limit: float = 0.0
    """end this run with a checkpoint after this many minutes (0 = no limit)"""
    cache_dir: str = ""
    """tokenized-data cache folder ('' = ~/.cache/newllm/tokens, 'none' = no cache)"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        for name in ("seq_len", "tbptt_segments", "warmup_steps", "eval_every", "save_every",
                     "log_every", "tokenizer_vocab", "threads", "eval_batches", "stop_at",
                     "time_limit", "eval_passkey", "eval_chat"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, "
                                 f"got {getattr(self, name)}")
        if self.lr <= 0 or self.gate_lr < 0:
            raise ValueError("--lr must be > 0 and --gate-lr >= 0")
        for item in self.lr_factor:
            lr_factor_item(item)
        if not 0.0 <= self.recall_words <= 1.0:
            raise ValueError("--recall-words must be in [0, 1]")
        if not 0.0 <= self.recall_at_start <= 1.0:
            raise ValueError("--recall-at-start must be in [0, 1]")
        if not 0.0 <= self.recall_fraction <= 1.0 or self.recall_weight < 0:
            raise ValueError("--recall-fraction must be in [0, 1] and --recall-weight >= 0")
        def over_one(*shares: float) -> bool:  # 0.3 + 0.3 + 0.4 is 1 here, not 1.0000000000000002
            return sum(shares) > 1.0 + 1e-9

        if (self.repeat_fraction < 0 or over_one(self.recall_fraction, self.repeat_fraction)
                or self.repeat_span < 2):
            raise ValueError("--repeat-fraction must be in [0, 1 - --recall-fraction] and "
                             "--repeat-span >= 2")
        if self.chat_fraction < 0 or over_one(self.recall_fraction, self.repeat_fraction,
                                              self.chat_fraction):
            raise ValueError("--chat-fraction must be in [0, 1 - --recall-fraction - "
                             "--repeat-fraction]")
        if not 0.0 <= self.chat_at_start <= 1.0:
            raise ValueError(f"--chat-at-start must be in [0, 1], got {self.chat_at_start}")
        if not 0.0 <= self.chat_acks <= 1.0:
            raise ValueError(f"--chat-acks must be in [0, 1], got {self.chat_acks}")
        if not 0.0 <= self.repeat_scramble <= 1.0:
            raise ValueError(f"--repeat-scramble must be in [0, 1], got {self.repeat_scramble}")
        if not 0.0 <= self.repeat_local <= 1.0:
            raise ValueError(f"--repeat-local must be in [0, 1], got {self.repeat_local}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor_item(item: str) -> tuple[str, float]:
    """One --lr-factor item, 'PATTERN=FACTOR', as (pattern, factor); a clear error otherwise."""
    pattern, sep, value = item.rpartition("=")
    try:
        factor = float(value)
    except ValueError:
        factor = -1.0
    if not sep or not pattern or not factor > 0 or math.isinf(factor):
        raise ValueError(f"--lr-factor {item!r}: expected PATTERN=FACTOR with a factor > 0, "
                         "e.g. 'layers.0.*=0.2'")
    return pattern, factor
