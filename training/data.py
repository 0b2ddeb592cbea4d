"""Training data: documents -> one token stream (EOS after every document, never padded) ->
fixed-length windows, deterministic batches, and an on-disk token cache.

Sources (`read_documents`):
- ``.txt`` / ``.md`` files: one document per file, except that a ``MANIFEST.tsv`` beside the
  file with rows ``name, split, ..., clean_bytes`` whose ``split`` equals the file's stem splits
  it into those documents (the Gutenberg layout: ``train.txt`` holds 61 books joined by blank
  lines, one manifest row per book).
- ``.jsonl`` files: one document per line, ``{"text": ...}``; ``{"prompt", "completion"}`` lines
  (the reversal-curse data) become ``prompt + completion``.
- folders: every such file under them, in sorted order.

The stream is ``doc_0 EOS doc_1 EOS ...``: short documents are packed, never padded (padding
taught the seeds' models EOS -> EOS), and the EOS tells the model where a document ends. A
window of ``L`` tokens is ``stream[i*L : i*L + L + 1]`` (inputs and shifted targets), so windows
tile the stream and the tail shorter than a window is dropped.

Batches are a pure function of (seed, step, rank): resuming at step k reads exactly the batches an
uninterrupted run would have read, with no sampler state to save.

The cache keeps tokenized sources as ``<key>.tokens.npy`` (uint16, or uint32 for vocabularies over
65,535) plus ``<key>.json`` (document names and offsets), keyed by every source file's path, size
and mtime and the tokenizer's sha256; a second run memory-maps it and starts at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl",)
CACHE_VERSION = 1


class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer (`newllm.tokenizer.Tokenizer` has it)."""

    eos_token_id: int
    vocab_size: int
    sha256: str

    def encode(self, text: str) -> list[int]: ...


# reading documents -------------------------------------------------------------------------
def source_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly plus every text/JSONL file under named folders (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {p} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if not files:
        raise ValueError("no data given: pass text files, folders or JSONL files")
    return files


def manifest_for(path: Path) -> Path | None:
    """The ``MANIFEST.tsv`` that splits ``path`` into documents, if there is one for it."""
    m = path.with_name("MANIFEST.tsv")
    if path.suffix not in TEXT_SUFFIXES or not m.is_file():
        return None
    with m.open(newline="") as fh:
        rows = csv.DictReader(fh, delimiter="\t")
        if rows.fieldnames is None or not {"name", "split", "clean_bytes"} <= set(rows.fieldnames):
            return None
        return m if any(r["split"] == path.stem for r in rows) else None


def split_by_manifest(data: bytes, sizes: Sequence[int], sep: bytes = b"\n\n\n") -> list[bytes]:
    """Cut ``data`` into documents of about ``sizes`` bytes joined by ``sep``.

    The manifest's sizes are the cleaned books' sizes; the join may differ from them by a few
    bytes of whitespace, so each cut is the separator nearest the expected end.
    """
    docs, start = [], 0
    for n in sizes[:-1]:
        expected = start + n
        lo, hi = max(start, expected - 64), expected + 64
        hits = [i for i in range(lo, hi) if data.startswith(sep, i)]
        if not hits:
            raise ValueError(f"no document separator near byte {expected}; manifest and text "
                             "do not match")
        cut = min(hits, key=lambda i: abs(i - expected))
        docs.append(data[start:cut + 1])  # keep the book's final newline
        start = cut + len(sep)
    docs.append(data[start:])
    return docs


def _read_text(path: Path) -> list[tuple[str, str]]:
    manifest = manifest_for(path)
    raw = path.read_bytes()
    if manifest is None:
        return [(path.name, raw.decode("utf-8", errors="replace"))]
    with manifest.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["split"] == path.stem]
    parts = split_by_manifest(raw, [int(r["clean_bytes"]) for r in rows])
    return [(f"{path.name}:{r['name']}", p.decode("utf-8", errors="replace"))
            for r, p in zip(rows, parts, strict=True)]


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    docs = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                text = obj["text"]
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) \
                    and isinstance(obj.get("completion"), str):
                text = obj["prompt"] + obj["completion"]
            else:
                raise ValueError(f'{path}:{n}: expected an object with a "text" string '
                                 f'(or "prompt" and "completion" strings)')
            docs.append((f"{path.name}:{n}", text))
    return docs


def read_documents(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(name, text) for every document in the given files and folders, in a stable order."""
    docs: list[tuple[str, str]] = []
    for f in source_files(paths):
        docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else _read_text(f))
    return docs


# the token stream -------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStream:
    """Documents joined as ``doc_0 EOS doc_1 EOS ...``.

    ``tokens`` (N,) uint16/uint32; ``starts`` (n_docs + 1,) int64 offsets: document i is
    ``tokens[starts[i] : starts[i+1] - 1]`` and ``tokens[starts[i+1] - 1]`` is its EOS.
    """

    tokens: np.ndarray
    starts: np.ndarray
    names: tuple[str, ...]
    eos_token_id: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return len(self.names)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, without its EOS."""
        return np.asarray(self.tokens[self.starts[i]:self.starts[i + 1] - 1])

    def subset(self, indices: Sequence[int]) -> TokenStream:
        """A new stream of the chosen documents (with their EOS), in the order given."""
        parts = [np.asarray(self.tokens[self.starts[i]:self.starts[i + 1]]) for i in indices]
        lengths = [len(p) for p in parts]
        tokens = np.concatenate(parts) if parts else self.tokens[:0].copy()
        starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        return TokenStream(tokens, starts, tuple(self.names[i] for i in indices),
                           self.eos_token_id)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _encode_all(tokenizer: TextTokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t) for t in texts]


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer: TextTokenizer) -> TokenStream:
    """Tokenize every document and join them with EOS (after each one, the last included)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_token_id
    parts, lengths = [], []
    step = 256  # documents per encode_batch call: bounded memory, still parallel
    for i in range(0, len(docs), step):
        for ids in _encode_all(tokenizer, [text for _, text in docs[i:i + step]]):
            arr = np.empty(len(ids) + 1, dtype=dtype)
            arr[:-1] = ids
            arr[-1] = eos
            parts.append(arr)
            lengths.append(len(arr))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    starts = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return TokenStream(tokens, starts, tuple(n for n, _ in docs), eos)


# the cache ---------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$NEWLLM_CACHE/tokens`` or ``$XDG_CACHE_HOME/newllm/tokens`` (``~/.cache/...``)."""
    if os.environ.get("NEWLLM_CACHE"):
        return Path(os.environ["NEWLLM_CACHE"]) / "tokens"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "newllm" / "tokens"


def cache_key(files: Sequence[Path], tokenizer_sha256: str) -> str:
    """Hash of every source file's (absolute path, size, mtime), its manifest's, the tokenizer."""
    entries = []
    for f in files:
        for p in (f, manifest_for(f)):
            if p is not None:
                st = p.stat()
                entries.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "files": entries, "tokenizer": tokenizer_sha256},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_token_stream(paths: Iterable[str | Path], tokenizer: TextTokenizer,
                      cache_dir: str | Path | None = None) -> TokenStream:
    """Read and tokenize ``paths``, through the on-disk cache unless ``cache_dir`` is None.

    Pass ``cache_dir=default_cache_dir()`` for the usual place.
    """
    files = source_files(paths)
    if cache_dir is None:
        return tokenize_documents(read_documents(files), tokenizer)
    folder = Path(cache_dir)
    key = cache_key(files, tokenizer.sha256)
    tok_path, meta_path = folder / f"{key}.tokens.npy", folder / f"{key}.json"
    if tok_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        tokens = np.load(tok_path, mmap_mode="r", allow_pickle=False)
        return TokenStream(tokens, np.asarray(meta["starts"], dtype=np.int64),
                           tuple(meta["names"]), int(meta["eos_token_id"]))
    stream = tokenize_documents(read_documents(files), tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "files": [str(f) for f in files],
            "tokenizer_sha256": tokenizer.sha256, "eos_token_id": stream.eos_token_id,
            "names": list(stream.names), "starts": stream.starts.tolist()}
    _atomic_write(tok_path, lambda fh: np.save(fh, stream.tokens, allow_pickle=False))
    _atomic_write(meta_path, lambda fh: fh.write(json.dumps(meta).encode()))
    return stream


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# train / validation split --------------------------------------------------------------------
def split_train_val(stream: TokenStream, val_fraction: float,
                    seed: int = 42) -> tuple[TokenStream, TokenStream]:
    """Hold out about ``val_fraction`` of the documents (chosen by ``seed``) for validation.

    With a single document there is nothing to split by: its last ``val_fraction`` of tokens
    becomes the validation stream instead.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = stream.num_documents
    if val_fraction == 0.0 or n == 0:
        return stream, stream.subset([])
    if n == 1:
        cut = int(len(stream) * (1.0 - val_fraction))
        tokens = np.asarray(stream.tokens)
        train = TokenStream(tokens[:cut], np.array([0, cut]), stream.names, stream.eos_token_id)
        val = TokenStream(tokens[cut:], np.array([0, len(tokens) - cut]), stream.names,
                          stream.eos_token_id)
        return train, val
    held = set(val_document_indices(n, val_fraction, seed))
    return (stream.subset([i for i in range(n) if i not in held]),
            stream.subset(sorted(held)))


def val_document_indices(n: int, val_fraction: float, seed: int = 42) -> list[int]:
    """Which of ``n`` documents `split_train_val` holds out (none for n < 2)."""
    if n < 2 or val_fraction <= 0.0:
        return []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[:n_val])


# windows and batches ---------------------------------------------------------------------------
class Windows:
    """Non-overlapping windows of ``length`` inputs (+1 target) tiling a token array."""

    def __init__(self, tokens: np.ndarray, length: int) -> None:
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        self.tokens, self.length = tokens, length
        self.count = max(0, (len(tokens) - 1) // length)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        """Window i as int64 (length + 1,): inputs ``w[:-1]``, targets ``w[1:]``."""
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} out of range ({self.count} windows)")
        s = i * self.length
        return torch.from_numpy(np.asarray(self.tokens[s:s + self.length + 1], dtype=np.int64))

    def batch(self, indices: Sequence[int]) -> Tensor:
        """(B, length + 1) int64."""
        return torch.stack([self[int(i)] for i in indices])


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


def batch_indices(num_windows: int, batch_size: int, step: int, *, seed: int = 42,
                  rank: int = 0, world_size: int = 1) -> list[int]:
    """The window indices rank ``rank`` trains on at ``step`` (0-based).

    Each epoch is a fresh permutation (seed + epoch) cut into batches of
    ``batch_size * world_size``; rank r takes the r-th slice, so ranks never share a window and
    the last incomplete batch of an epoch is skipped.
    """
    per_step = batch_size * world_size
    per_epoch = num_windows // per_step
    if per_epoch == 0:
        raise ValueError(
            f"the training data has {num_windows} windows but one step needs {per_step} "
            f"(batch size {batch_size} x {world_size} processes); add data or lower "
            "--batch-size / --seq-len"
        )
    epoch, i = divmod(step, per_epoch)
    perm = _permutation(num_windows, seed + epoch)
    start = i * per_step + rank * batch_size
    return list(perm[start:start + batch_size])


# synthetic recall examples ---------------------------------------------------------------------
PASSKEY_FACT = " The pass key is {k}. Remember it. {k} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
WORD_FACT = " The secret word is {k}. Remember it. {k} is the secret word."
WORD_QUESTION = " What is the secret word? The secret word is"
"""the sentences that tell and ask a key ({k}: five digits, or a word), in training examples and
in `newllm eval --passkey` alike"""


def prose_words(text: str) -> list[str]:
    """The words of ``text`` that can be a secret word, in order: letters only, four or more,
    punctuation around them stripped."""
    return [w for w in (t.strip(".,;:!?\"'()[]_*“”‘’") for t in text.split())
            if len(w) >= 4 and w.isalpha()]


class RecallExamples:
    """Turn real training windows into fact-recall examples (a pass key told early, asked late).

    A window of real prose gets ``" The pass key is N. Remember it. N is the pass key."``
    written over it in some segment, and ``" What is the pass key? The pass key is N."`` over its
    end, ``distance`` segments later (0 = the same segment, up to as far as the window allows,
    chosen uniformly). The answer tokens are returned as a mask so the loss can weight them. Mixed
    into training, these teach the memory to store and fetch a fact across segments. With
    ``at_start`` that share of examples opens with EOS and the fact instead, as a fact told at
    the start of a conversation is: the first tokens after a document's start look different
    to the layers below the memory, and a model never shown a fact there can miss it. With
    ``words`` that share of examples tells and asks for a secret word from the window's own
    prose instead (" The secret word is W. Remember it. W is the secret word.").
    """

    def __init__(self, tokenizer: TextTokenizer, segment_len: int, at_start: float = 0.0,
                 words: float = 0.0) -> None:
        if not 0.0 <= at_start <= 1.0 or not 0.0 <= words <= 1.0:
            raise ValueError(f"at_start and words must be in [0, 1], got {at_start}, {words}")
        self.tokenizer, self.S, self.at_start, self.words = tokenizer, segment_len, at_start, words
        self.question = tokenizer.encode(PASSKEY_QUESTION)
        self.word_question = tokenizer.encode(WORD_QUESTION)

    def _key(self, window: Tensor, rng: Any) -> tuple[list[int], list[int], list[int]]:
        """(fact, question, answer) token ids: a pass key of five digits or, for a ``words``
        share, a secret word drawn from the window's own prose (letters only, four or more):
        practice in carrying any word, not only digits. Draws the word's share only when
        ``words`` is set, so that ``words=0`` leaves the random stream as it was."""
        enc = self.tokenizer.encode
        if self.words and rng.random() < self.words:
            pool = prose_words(self.tokenizer.decode(window.tolist()))
            if pool:
                word = pool[rng.randrange(len(pool))]
                return enc(WORD_FACT.format(k=word)), self.word_question, enc(f" {word}.")
        key = rng.randint(10_000, 99_999)
        return enc(PASSKEY_FACT.format(k=key)), self.question, enc(f" {key}.")

    def make(self, window: Tensor, rng: Any) -> tuple[Tensor, Tensor, int]:
        """window (L + 1,) -> (new window (L + 1,), answer mask over targets (L,), distance).

        ``rng`` is a `random.Random`. The window is returned unchanged (mask all False,
        distance -1) when it is too short for the fact and the question.
        """
        fact, question, answer = self._key(window, rng)
        tail = question + answer
        n, S = len(window), self.S
        mask = torch.zeros(n - 1, dtype=torch.bool)
        q0 = n - len(tail)  # the question starts here
        if q0 - len(fact) < 0:
            return window, mask, -1
        q_seg = q0 // S
        new = window.clone()
        if self.at_start and q0 > len(fact) and rng.random() < self.at_start:
            new[0] = self.tokenizer.eos_token_id  # a document starts with the fact
            end = 1 + len(fact)
        else:
            # segments where the fact can end (it must end before the question starts)
            last_seg = (q0 - 1) // S
            first_seg = (len(fact) - 1) // S
            end_seg = rng.randint(first_seg, last_seg)
            lo = max(end_seg * S + 1, len(fact))  # fact end (exclusive) within that segment
            hi = min((end_seg + 1) * S, q0)
            end = rng.randint(lo, max(lo, hi))
        new[end - len(fact):end] = torch.tensor(fact, dtype=window.dtype)
        new[q0:] = torch.tensor(tail, dtype=window.dtype)
        mask[n - 1 - len(answer):] = True  # targets t -> window[t + 1]
        return new, mask, q_seg - (end - 1) // S


def repeat_span(window: Tensor, segment_len: int, span: int, rng: Any, *,
                local: bool = False, scramble: bool = False, eos: int | None = None
                ) -> tuple[Tensor, Tensor]:
    """Copy a span of real prose from an earlier segment into a later one (copy practice).

    A window (L + 1,) gets ``span`` of its own tokens from segment i written again into segment
    j > i (the two places chosen uniformly), so every token of the copy after the first is
    predictable only through what was seen one or more segments earlier: the memory's job. With
    ``local`` the copy lands later in the same segment instead (``span`` at most half a segment),
    which local attention can serve: practice for the in-context copying that fetching from the
    memory builds on. With ``scramble`` the span is first overwritten with tokens drawn at random
    from the window (EOS aside), so its first pass is unpredictable and only copying lowers the
    repeat's loss: the plainest signal for induction heads. Returns (new window, mask over
    targets (L,) marking the copy's predictable tokens); the window comes back unchanged (mask
    all False) when there is no room for the copy.
    """
    n, S = len(window), segment_len
    mask = torch.zeros(n - 1, dtype=torch.bool)
    segments = (n - 1) // S
    if local:
        if segments < 1 or not 2 <= span <= S // 2:
            return window, mask
        seg = rng.randrange(segments)
        src = seg * S + rng.randrange(S - 2 * span + 1)
        dst = rng.randrange(src + span, seg * S + S - span + 1)
    else:
        if segments < 2 or not 2 <= span <= S:
            return window, mask
        src_seg = rng.randrange(segments - 1)
        dst_seg = rng.randrange(src_seg + 1, segments)
        src = src_seg * S + rng.randrange(S - span + 1)
        dst = dst_seg * S + rng.randrange(S - span + 1)
    new = window.clone()
    if scramble:
        pool = window[window != eos].tolist() if eos is not None else window.tolist()
        if pool:
            new[src:src + span] = torch.tensor([pool[rng.randrange(len(pool))]
                                                for _ in range(span)], dtype=window.dtype)
    new[dst:dst + span] = new[src:src + span]
    mask[dst:dst + span - 1] = True  # target t is window[t + 1]: the copy's tokens 1..span-1
    return new, mask
