"""Train the project's own byte-level BPE tokenizer with the `tokenizers` library.

Byte-level like GPT-2's: every UTF-8 text round-trips, no unknown token. ``<|endoftext|>`` is the
first special token and so gets id 0, which is the presets' ``eos_token_id``. The result is a
plain ``tokenizer.json`` that `newllm.tokenizer.Tokenizer.from_file` and transformers'
``PreTrainedTokenizerFast(tokenizer_file=...)`` both load.

    python -m training tokenizer --data $DATA/gutenberg/train.txt --vocab-size 8192 \\
        --out tokenizer.json
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"


def _chunks(texts: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """Long documents cut at line ends into ~1 MB pieces (the trainer counts words, so cutting
    at a newline changes nothing but memory use)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
                    path: str | Path | None = None) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` = 0) trained on ``texts``.

    Returns a `newllm.tokenizer.Tokenizer`; writes ``tokenizer.json`` to ``path`` if given.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from newllm.tokenizer import Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} "
                         f"(256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    if tok.token_to_id(EOS_TOKEN) != 0:
        raise RuntimeError(f"{EOS_TOKEN} did not get id 0")
    result = Tokenizer.from_str(tok.to_str())
    if path is not None:
        result.save(path)
    return result
