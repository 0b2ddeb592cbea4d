"""Model configuration: one dataclass, named presets, and the `create_model` factory.

A config describes a `TransformerLM` completely and is saved as ``config.json`` beside the
weights. Layer types are strings, one per layer, so any mix of token mixers is a config:
``ModelConfig(layers=("multi_memory", "infini", "pythia", "pythia"))``.

Context models put a `ContextBlock` between the token embedding and the layers:
- ``context_mode="input"`` (Context-Pythia): the layers run on ``context_dim``-wide contexts,
  so every layer's KV cache is ``context_dim / hidden_size`` of Pythia's.
- ``context_mode="kv"`` (Context-KV): the layers run on ``hidden_size`` token states, and their
  keys and values come from one context vector per ``chunk_size`` tokens (plus the current one).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTEXT_MODES = ("none", "input", "kv")


# options added after the first release, with the value that means "not used": left out of the
# fingerprint at that value (see ModelConfig.fingerprint_json)
FINGERPRINT_LATER_FIELDS: dict[str, Any] = {"memory_key_shift": False,
                                             "memory_write_gate": False, "memory_history": 0,
                                             "memory_stable_delta": False,
                                             "memory_write_floor": 0.0,
                                             "memory_key_self": True,
                                             "attention_key_shift": False,
                                             "pointer_dim": 0, "pointer_token_keys": False,
                                             "pointer_gate_inputs": [], "pointer_span": 1,
                                             "pointer_delay": 0}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a model's shape and behaviour (not its weights)."""

    name: str = "custom"
    vocab_size: int = 50304
    hidden_size: int = 512
    layers: tuple[str, ...] = ("pythia",) * 6
    num_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    eos_token_id: int = 0
    init_std: float = 0.02
    # memory layers (infini, multi_memory, hierarchical)
    segment_len: int = 256
    use_delta_rule: bool = True
    memory_heads: int = 1
    num_memory_banks: int = 1
    segments_per_bank: int = 4
    num_memories: int = 4
    gate_init: float = 0.0
    # memory keys mix in the previous token's key (a learned per-channel weight, starting at
    # 1): a later query like token X then finds what came right after X, which is what recalling
    # a told fact needs (the short convolutions of modern linear-attention models do the same)
    memory_key_shift: bool = False
    # the generalisation of the shift: memory keys add the keys of up to this many previous
    # tokens of the segment, and memory queries add them too (learned per-channel weights; keys
    # start as the shift, queries at 0), so a fact is stored and asked under a few tokens of
    # context ("pass key is" -> 7) rather than one common word ("is" -> 7)
    memory_history: int = 0
    # with memory_history: whether a token's own key is part of the key it writes under. False:
    # the key is the previous tokens' keys alone, so the memory maps "what came before" to the
    # token itself, and a question ending in the same words ("Your name is") is asked under the
    # key the value was written under, whatever the value's own key (which a query cannot know).
    # Fine-tuning the bundled model this way (session 14, training/README.md) did not make names
    # recallable and cost pass-key recall; the option stays for experiments from scratch
    memory_key_self: bool = True
    # a learned write strength per token and memory head, sigmoid of the token's memory key and
    # value (starting at 0.5 everywhere): tokens written weakly barely change the memory or its
    # normaliser, so a fact written strongly survives segments of filler written weakly
    memory_write_gate: bool = False
    # the delta rule made safe for long gaps and saturated write gates: its correction scaled by
    # η = 1 / max(1, ‖G‖_F) (G: the segment's write operator) so a write never expands the
    # memory, and its retrieval computed from the ungated features σ(K), where σ(k)·z cannot
    # underflow (see newllm.layers.memory; the plain gated rule gave NaN gradients on the toy)
    memory_stable_delta: bool = False
    # a floor ε under the write gate: β = ε + (1 − ε) sigmoid(·) ∈ (ε, 1), so filler cannot be
    # written with β ~ 1e-38 (a saturated gate: float32 denormals in the delta rule, and a
    # normaliser so small that the next strong write's operator G is huge). 0: no floor (the
    # plain gate, bit for bit); needs memory_write_gate
    memory_write_floor: float = 0.0
    # pythia layers attend only within the current segment (KV dropped at segment ends), so a
    # memory model's whole state stays bounded; the memory presets set it
    segment_local: bool = False
    # "smeared keys" for the pythia layers' softmax attention: each key adds the previous
    # token's key (of the attended span: the segment with segment_local) times a learned
    # per-channel weight, starting at 0 (the plain attention, so a trained model warm-starts
    # unchanged). A query like token X then finds the token after an earlier X in one layer,
    # the copying (induction) that plain attention needs two composed layers and long training
    # for (Olsson et al. 2022 saw it form sooner with such keys). The cache keeps the plain
    # keys, so states and memory files keep their shape
    attention_key_shift: bool = False
    # a pointer cache over the tokens read (`newllm.pointer`): its key width, 0 = none; and
    # whether its keys also read the tokens' input embeddings
    pointer_dim: int = 0
    pointer_token_keys: bool = False
    # what the pointer's mixing gate reads besides the hidden state (`newllm.pointer`,
    # POINTER_GATE_INPUTS): "focus", how concentrated the read is (log Σ p_copy², so a read
    # spread over many tokens can count for less), and "momentum", the previous read's
    # probability of the token that came (so a copy of several tokens goes on)
    pointer_gate_inputs: tuple[str, ...] = ()
    # how many tokens the pointer reads after each pair it finds (`newllm.pointer`): 1 = the
    # next token; L > 1 also reads the L - 1 after it with the same query, each from its own
    # masses (so a name's or number's later tokens come from where its first was found)
    pointer_span: int = 1
    # the pointer reads only pairs written at least this many tokens before (0: every pair): what
    # was just said is the local attention's to copy, and a reply cannot feed on itself
    pointer_delay: int = 0
    # context compression (context_pythia, context_kv)
    context_mode: str = "none"
    context_dim: int = 256
    context_ffn_dim: int = 512
    chunk_size: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "pointer_gate_inputs", tuple(self.pointer_gate_inputs))
        from newllm.layers import LAYERS  # local import: the registry imports this module

        if not self.layers:
            raise ValueError("config.layers is empty; give at least one layer type")
        for kind in self.layers:
            if kind not in LAYERS:
                raise ValueError(f"unknown layer type {kind!r}; choose from {sorted(LAYERS)}")
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(
                f"unknown context_mode {self.context_mode!r}; choose from {list(CONTEXT_MODES)}"
            )
        uses_kv = "context_kv" in self.layers
        if uses_kv and self.context_mode != "kv":
            raise ValueError("layer type 'context_kv' needs context_mode='kv'")
        if self.context_mode == "kv" and not uses_kv:
            raise ValueError("context_mode='kv' needs at least one 'context_kv' layer")
        for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size",
                     "segment_len", "memory_heads", "num_memory_banks", "segments_per_bank",
                     "num_memories", "context_dim", "context_ffn_dim", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layer_hidden % self.num_heads:
            raise ValueError(
                f"layer width {self.layer_hidden} is not divisible by num_heads={self.num_heads}"
            )
        if self.pointer_dim < 0:
            raise ValueError(f"pointer_dim must be >= 0 (0: no pointer), got {self.pointer_dim}")
        if self.pointer_token_keys and not self.pointer_dim:
            raise ValueError("pointer_token_keys shapes the pointer's keys; set pointer_dim >= 1 "
                             "or leave pointer_token_keys false")
        from newllm.pointer import POINTER_GATE_INPUTS

        for name in self.pointer_gate_inputs:
            if name not in POINTER_GATE_INPUTS:
                raise ValueError(f"unknown pointer gate input {name!r}; choose from "
                                 f"{list(POINTER_GATE_INPUTS)}")
        if len(set(self.pointer_gate_inputs)) != len(self.pointer_gate_inputs):
            raise ValueError("pointer_gate_inputs names one twice: "
                             f"{list(self.pointer_gate_inputs)}")
        if self.pointer_span < 1:
            raise ValueError(f"pointer_span must be >= 1 (1: the next token), got "
                             f"{self.pointer_span}")
        if self.pointer_span > 1 and not self.pointer_dim:
            raise ValueError("pointer_span shapes the pointer's reads; set pointer_dim >= 1 or "
                             "leave pointer_span at 1")
        if self.pointer_delay < 0:
            raise ValueError(f"pointer_delay must be >= 0 (0: no delay), got {self.pointer_delay}")
        if self.pointer_delay and not self.pointer_dim:
            raise ValueError("pointer_delay shapes the pointer's reads; set pointer_dim >= 1 or "
                             "leave pointer_delay at 0")
        if self.pointer_gate_inputs and not self.pointer_dim:
            raise ValueError("pointer_gate_inputs feed the pointer's gate; set pointer_dim >= 1 "
                             "or leave pointer_gate_inputs empty")
        if self.memory_history < 0:
            raise ValueError(f"memory_history must be >= 0, got {self.memory_history}")
        if not self.memory_key_self and not self.memory_history:
            raise ValueError("memory_key_self=false keys the memory by the previous tokens: set "
                             "memory_history >= 1 too")
        if self.memory_history and self.memory_key_shift:
            raise ValueError("memory_history includes the key shift; set memory_history or "
                             "memory_key_shift, not both")
        if self.memory_stable_delta and not self.use_delta_rule:
            raise ValueError("memory_stable_delta changes the delta rule; set "
                             "use_delta_rule=true or leave memory_stable_delta false")
        if not 0.0 <= self.memory_write_floor < 1.0:
            raise ValueError(f"memory_write_floor must be in [0, 1), got {self.memory_write_floor}")
        if self.memory_write_floor and not self.memory_write_gate:
            raise ValueError("memory_write_floor bounds the write gate; set "
                             "memory_write_gate=true or leave memory_write_floor 0")
        if self.layer_hidden % self.memory_heads:
            raise ValueError(
                f"layer width {self.layer_hidden} is not divisible by "
                f"memory_heads={self.memory_heads}"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ValueError(f"rotary dims ({self.rotary_dims}) must be even")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id} outside the vocabulary")

    # derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_hidden(self) -> int:
        """Width of the residual stream the layers run on."""
        return self.context_dim if self.context_mode == "input" else self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.layer_hidden // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def has_context_block(self) -> bool:
        return self.context_mode != "none"

    # serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["pointer_gate_inputs"] = list(self.pointer_gate_inputs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def fingerprint_json(self) -> str:
        """The config as the model fingerprint hashes it: `to_json` without the fields added
        after the first release while they hold their default (`FINGERPRINT_LATER_FIELDS`), so
        a new option does not change the fingerprint of models that do not use it — memory
        files saved before it still load."""
        d = self.to_dict()
        for name, default in FINGERPRINT_LATER_FIELDS.items():
            if d.get(name) == default:
                del d[name]
        return json.dumps(d, indent=2, sort_keys=True)

    def replace(self, **overrides: Any) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config options {unknown}; known options are {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by exact name: ``ModelConfig.from_name("infini-70m", segment_len=128)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name].replace(name=name, **overrides) if overrides else PRESETS[name]


def _p(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, **kw)


_PY6 = ("pythia",) * 6
_TINY = dict(vocab_size=512, hidden_size=64, num_heads=4, intermediate_size=256,
             segment_len=16, chunk_size=8, context_dim=32, context_ffn_dim=64,
             max_position_embeddings=4096)
_SMALL = dict(vocab_size=8192, hidden_size=256, num_heads=8, intermediate_size=1024,
              segment_len=128, chunk_size=64, context_dim=128, context_ffn_dim=256)

PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in [
        # Pythia-70M's exact shape (70,426,624 parameters)
        _p("pythia-70m", layers=_PY6),
        _p("infini-70m", layers=("infini",) + _PY6[1:], segment_local=True),
        _p("multi-memory-70m", layers=("multi_memory",) + _PY6[1:], segment_local=True),
        _p("hierarchical-70m", layers=("hierarchical",) + _PY6[1:], segment_local=True),
        _p("context-pythia-70m", layers=_PY6, context_mode="input", context_dim=256,
           intermediate_size=1024),
        _p("context-kv-70m", layers=("context_kv",) * 6, context_mode="kv", context_dim=256),
        # tiny presets for tests: 2 layers, 64 wide
        _p("tiny-pythia", layers=("pythia",) * 2, **_TINY),
        _p("tiny-infini", layers=("infini", "pythia"), segment_local=True, **_TINY),
        _p("tiny-multi-memory", layers=("multi_memory", "pythia"), segment_local=True, **_TINY),
        _p("tiny-hierarchical", layers=("hierarchical", "pythia"), segment_local=True, **_TINY),
        _p("tiny-context-pythia", layers=("pythia",) * 2, context_mode="input",
           **{**_TINY, "context_dim": 32}),
        _p("tiny-context-kv", layers=("context_kv",) * 2, context_mode="kv", **_TINY),
        # small presets (the bundled default checkpoint and the kind comparison)
        _p("small-pythia", layers=("pythia",) * 4, **_SMALL),
        _p("small-infini", layers=("pythia", "infini", "pythia", "pythia"), segment_local=True,
           **_SMALL),
        _p("small-multi-memory", layers=("pythia", "multi_memory", "pythia", "pythia"),
           segment_local=True, **_SMALL),
        _p("small-hierarchical", layers=("pythia", "hierarchical", "pythia", "pythia"),
           segment_local=True, **_SMALL),
        _p("small-context-pythia", layers=("pythia",) * 4, context_mode="input",
           **{**_SMALL, "intermediate_size": 512}),
        _p("small-context-kv", layers=("context_kv",) * 4, context_mode="kv", **_SMALL),
    ]
}

# the seeds' model kinds -> the 70M preset each one starts from
KINDS: dict[str, str] = {
    "pythia": "pythia",
    "infini": "infini",
    "multi_memory": "multi-memory",
    "hierarchical": "hierarchical",
    "context_pythia": "context-pythia",
    "context_kv": "context-kv",
}


def config_for(kind: str, size: str = "70m", **options: Any) -> ModelConfig:
    """The config `create_model` builds: preset ``{kind}-{size}`` with ``options`` applied."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {sorted(KINDS)}")
    sizes = sorted({n.rsplit("-", 1)[-1] for n in PRESETS if "-" in n} |
                   {n.split("-", 1)[0] for n in PRESETS if n.startswith(("tiny-", "small-"))})
    if size in ("tiny", "small"):
        name = f"{size}-{KINDS[kind]}"
    else:
        name = f"{KINDS[kind]}-{size}"
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r} for kind {kind!r} at size {size!r}; sizes: {sizes}")
    return ModelConfig.from_name(name, **options)

