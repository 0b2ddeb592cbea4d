"""Tokenizers: a thin wrapper around Hugging Face `tokenizers`, plus the project's byte-level one.

A checkpoint carries its tokenizer as ``tokenizer.json`` (the `tokenizers` library's format, which
transformers' ``PreTrainedTokenizerFast(tokenizer_file=...)`` also reads). `Tokenizer` adds what
the rest of newllm needs on top of the backend: the EOS id, the vocabulary size, and a hash that
memory files record so that a memory is never continued under another tokenizer.

`Tokenizer.byte_level()` needs no training and no files: id 0 is ``<|endoftext|>`` and byte b is
id b + 1 (vocabulary 257, so it fits the tiny presets, whose EOS id is 0). It round-trips any
text: encoding is the text's UTF-8 bytes, one token each. Like every tokenizer with special
tokens, it encodes the literal text ``<|endoftext|>`` as the EOS token (and decodes it back).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
# Special tokens that mean "end of text" in common tokenizers, tried in this order when a
# tokenizer.json is loaded without saying which one is EOS.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: every byte as a printable character (the GPT-2 convention).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes map, in
    order, to the code points 256, 257, ... This is the alphabet of `tokenizers`' ByteLevel
    pre-tokenizer and decoder, so a vocabulary written in it decodes back to the original bytes.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _drop_useless_word_cache(backend: tokenizers.Tokenizer, json_str: str) -> None:
    """Turn off the BPE word cache of a tokenizer without merges (the byte-level one).

    The backend caches up to 10,000 pre-tokenized "words" with their tokens. Without merges
    there is nothing to save by caching, and the byte-level tokenizer does not split on spaces,
    so each cached word is a whole text (those under 256 characters): 3,000 distinct texts of
    200 characters took 19 MiB, a full cache ~60 MiB per process, and a server's workers grew
    for many minutes (found by scripts/soak.py). Tokenizers with merges keep the cache (real
    words, and it speeds encoding up). The tokenizer's JSON, and so its hash, is unchanged.
    """
    model = json.loads(json_str).get("model") or {}
    resize = getattr(backend.model, "_resize_cache", None)  # tokenizers >= 0.20
    if model.get("type") == "BPE" and not model.get("merges") and resize is not None:
        resize(0)


class Tokenizer:
    """Text <-> token ids, backed by a `tokenizers.Tokenizer`.

    ``eos_token_id`` is found among the special tokens (``<|endoftext|>``, ``</s>``, ...) unless
    given. `encode` adds no special tokens (a language model continues the text as it is);
    `decode` keeps special tokens, so ``decode(encode(text)) == text`` for byte-level tokenizers.
    Ids the vocabulary does not have decode to nothing (that is the backend's behaviour).
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token_id: int | None = None) -> None:
        self._backend = backend
        self._json = backend.to_str()
        self.sha256 = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if eos_token_id is None:
            eos_token_id = self._find_eos()
        if not 0 <= eos_token_id < self.vocab_size:
            raise ValueError(
                f"eos_token_id {eos_token_id} is outside the tokenizer's vocabulary "
                f"(size {self.vocab_size})"
            )
        self.eos_token_id = int(eos_token_id)
        _drop_useless_word_cache(backend, self._json)

    # constructors --------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, eos_token_id: int | None = None) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a folder holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {p}; give the path of a tokenizer.json written by "
                "Tokenizer.save or by transformers' save_pretrained"
            )
        return cls.from_str(p.read_text(encoding="utf-8"), eos_token_id)

    @classmethod
    def from_str(cls, json_str: str, eos_token_id: int | None = None) -> Tokenizer:
        """Build from the text of a ``tokenizer.json``."""
        try:
            backend = tokenizers.Tokenizer.from_str(json_str)
        except Exception as exc:  # the backend raises a bare Exception on bad JSON
            raise ValueError(f"not a valid tokenizer.json: {exc}") from exc
        return cls(backend, eos_token_id)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """The project's byte tokenizer: ``<|endoftext|>`` = 0, byte b = b + 1, vocab 257."""
        vocab = {EOS_TOKEN: 0}
        for b, ch in byte_to_unicode().items():
            vocab[ch] = b + 1
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return cls(backend, eos_token_id=0)

    # use -----------------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids],
                                    skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a folder to write it into)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self._json, encoding="utf-8")
        return p

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
                f"sha256={self.sha256[:12]}...)")

    # internals -----------------------------------------------------------------------------
    def _find_eos(self) -> int:
        specials = {t.content: i for i, t in self._backend.get_added_tokens_decoder().items()
                    if t.special}
        for name in EOS_CANDIDATES:
            if name in specials:
                return specials[name]
        raise ValueError(
            f"cannot tell which token is end-of-text; special tokens are {sorted(specials)}. "
            "Pass eos_token_id= (e.g. the model config's eos_token_id)"
        )
