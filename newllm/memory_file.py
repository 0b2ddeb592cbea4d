"""Memory files: a model's state as a safetensors file that can move between machines.

A memory file is a plain safetensors file (data, never code: no pickle anywhere). Its tensors are
the state's flat tensors (``layers.3.memory``, ``layers.1.k``, ``context.last``, ...), each saved
contiguous and on its own (a KV cache that views a larger buffer is saved as the view only). Its
string metadata says what the tensors mean and what they may be loaded into:

=================  ==============================================================================
format             ``newllm-memory``
format_version     ``2`` (this newllm writes 2 and reads 1 and 2; version 1 has no
                   ``metadata_sha256``)
model_fingerprint  `TransformerLM.fingerprint()`: SHA-256 of the config and every weight
config_name        the config's name (informative; the fingerprint is what is checked)
tokenizer_hash     SHA-256 of the tokenizer (optional; checked when the loader knows its own)
dtype              torch dtype of every tensor, e.g. ``float32``
position           tokens seen (a decimal integer)
batch_size         rows of the state (a decimal integer)
layer_kinds        JSON list of the layer types, e.g. ``["infini", "pythia"]``
payload_sha256     `payload_sha256` of the tensors, so a transfer can be verified end to end
created_by         ``newllm <version>``
checkpoint_fingerprint  `TransformerLM.checkpoint_fingerprint()`: the checkpoint, whatever
                   precision or device served it (optional: files before it lack it)
config_fingerprint SHA-256 of the config (optional), so a refusal can say what differs
device_type        ``cpu``, ``cuda``, ... of the model that wrote it (optional, informative)
weights_dtype      torch dtype of the model's linear weights when it differs from ``dtype``
                   (``float16`` under `TransformerLM.use_half_weights`; optional: absent, they
                   are ``dtype``)
torch_version      torch's version there (optional, informative)
metadata_sha256    `metadata_sha256` of every other metadata entry (reserved keys and the caller's
                   own, e.g. a server's ``session.*`` transcript): SHA-256, lowercase hex, of the
                   UTF-8 bytes of ``json.dumps(entries, sort_keys=True, ensure_ascii=True,
                   separators=(",", ":"))``, i.e. one JSON object, keys sorted by code point, no
                   whitespace, every non-ASCII character as a ``\\uXXXX`` escape. Required from
                   version 2; checked whenever present
=================  ==============================================================================

The two hashes chain: ``metadata_sha256`` covers ``payload_sha256``, which covers every tensor's
name, dtype, shape and bytes, so a file that still parses but says anything other than what was
saved (one flipped value, position, fingerprint or transcript entry) is refused. Both catch
accidents, not forgers: anyone who edits a file can recompute them (see `_check_values`).
Version 1 files (no ``metadata_sha256``, written before it existed) still load.

Loading trusts nothing. `load_memory` first parses the safetensors framing itself (header length,
JSON header, dtypes, shapes, offsets that tile the data region exactly), so a header that claims
terabytes allocates nothing and a cut-off file is reported as truncated; then it checks the
metadata, the model fingerprint, the tokenizer, every tensor's name, shape and dtype against
`model.state_shapes`, the payload hash, finiteness and value ranges, then (last, so that a file
with a specific problem gets that problem's code) the metadata hash, and only then builds a new
`ModelState`. Every refusal is a `MemoryFileError` (a ValueError) whose ``.code`` names the
problem. `read_memory_metadata` checks the framing, the metadata and its hash (no model needed).

Moves across precision and device: a file loads into the model whose `fingerprint` wrote it,
and also into any copy of the *same checkpoint* served at another precision or on another
device (same ``checkpoint_fingerprint``): its tensors are then converted to what the receiving
model keeps (memory tensors stay float32; the open segment, KV caches and contexts take the
model's dtype), after every check on the file as written, and `load_memory_report` says from
what. ``strict=True`` refuses such a file instead (`ConversionRefusedError`). A file of another
checkpoint is `ModelMismatchError`, whose message says whether the config or the weights differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from newllm.state import ModelState

FORMAT_NAME = "newllm-memory"
FORMAT_VERSION = "2"  # what save_memory writes
READ_VERSIONS = ("1", "2")  # what load_memory reads; "1": no metadata_sha256
MAX_HEADER_BYTES = 1 << 20  # a memory file's JSON header is a few KB; refuse anything over 1 MiB
# tokens seen; larger is refused as corrupt. 2**24 is where float32 stops counting exactly (rotary
# angles), and a hostile position must not make the next forward build a giant rotary table
MAX_POSITION = 1 << 24
MAX_BATCH = 1 << 16
RESERVED_KEYS = ("format", "format_version", "model_fingerprint", "config_name",
                 "tokenizer_hash", "dtype", "position", "batch_size", "layer_kinds",
                 "payload_sha256", "created_by", "metadata_sha256", "checkpoint_fingerprint",
                 "config_fingerprint", "device_type", "torch_version", "weights_dtype")
REQUIRED_KEYS = {  # format_version -> the keys a file of that version must carry
    "1": ("format", "format_version", "model_fingerprint", "dtype", "position", "batch_size",
          "layer_kinds", "payload_sha256"),
    "2": ("format", "format_version", "model_fingerprint", "dtype", "position", "batch_size",
          "layer_kinds", "payload_sha256", "metadata_sha256"),
}

# safetensors dtype name -> (torch dtype, bytes per element); only whole-byte dtypes
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1), "C64": (torch.complex64, 8),
    "U64": (torch.uint64, 8), "U32": (torch.uint32, 4), "U16": (torch.uint16, 2),
}
ST_NAME = {dt: name for name, (dt, _) in DTYPES.items()}
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,18})")  # int() alone would accept " 1_0"
_HEX64 = re.compile(r"[0-9a-f]{64}")


# errors ------------------------------------------------------------------------------------
class MemoryFileError(ValueError):
    """A memory file was refused. ``code`` is a short machine-readable reason."""

    code = "memory_file"


class NotSafetensorsError(MemoryFileError):
    code = "not_safetensors"


class TruncatedError(MemoryFileError):
    code = "truncated"


class FormatVersionError(MemoryFileError):
    code = "format_version"


class MetadataError(MemoryFileError):
    code = "bad_metadata"


class ModelMismatchError(MemoryFileError):
    code = "model_mismatch"


class ConversionRefusedError(MemoryFileError):
    """The file is of this checkpoint at another precision, and conversions were refused."""

    code = "conversion_refused"


class TokenizerMismatchError(MemoryFileError):
    code = "tokenizer_mismatch"


class TensorMismatchError(MemoryFileError):
    code = "tensor_mismatch"


class NonFiniteError(MemoryFileError):
    code = "non_finite"


class ValueRangeError(MemoryFileError):
    code = "out_of_range"


class ChecksumError(MemoryFileError):
    code = "checksum_mismatch"


class MetadataChecksumError(ChecksumError):
    """The metadata does not match its ``metadata_sha256``: the header was edited or damaged."""

    code = "metadata_checksum"


class TooLargeError(MemoryFileError):
    code = "too_large"


# hashing -----------------------------------------------------------------------------------
def _payload_hash(entries: list[tuple[str, str, list[int], bytes | memoryview]]) -> str:
    """SHA-256 over (name, safetensors dtype, shape, raw bytes) of each tensor, sorted by name."""
    h = hashlib.sha256()
    for name, dtype, shape, data in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}|{dtype}|{','.join(map(str, shape))}|{len(data)}|".encode())
        h.update(data)
    return h.hexdigest()


def _raw_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def payload_sha256(tensors: ModelState | Mapping[str, Tensor]) -> str:
    """The ``payload_sha256`` a memory file of these tensors (or this state) carries.

    Independent of the file's layout: the same tensors always give the same hash, so a receiver
    can check a transfer with ``read_memory_metadata(data)["payload_sha256"]``.
    """
    flat = tensors.flat_tensors() if isinstance(tensors, ModelState) else dict(tensors)
    return _payload_hash([(n, ST_NAME[t.dtype], list(t.shape), _raw_bytes(t))
                          for n, t in flat.items()])


def config_fingerprint(config: Any) -> str:
    """The ``config_fingerprint`` of a model config: SHA-256 of what the model fingerprint
    hashes of it."""
    return hashlib.sha256(config.fingerprint_json().encode()).hexdigest()


def metadata_sha256(metadata: Mapping[str, str]) -> str:
    """The ``metadata_sha256`` of a memory file whose metadata is ``metadata`` (an entry named
    ``metadata_sha256`` itself is left out): SHA-256 of the canonical JSON of the other entries
    (see the module docstring). Keys and values are strings, so the encoding is one to one."""
    entries = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    canonical = json.dumps(entries, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# saving ------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_memory(state: ModelState, model: Any, path: str | Path | None = None, *,
                tokenizer_hash: str | None = None,
                metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``state`` (of ``model``) to memory-file bytes; also write them to ``path``.

    The file is written atomically (temp file in the same folder, fsync, rename), so a reader
    sees the old file or the new one, never half of one. ``metadata`` adds string entries
    (keys must not clash with the reserved ones). A state with NaN/inf is refused: a file that
    no model would load is no use to anyone.
    """
    import newllm  # late: newllm/__init__ may import this module

    expected = model.state_shapes(state.batch_size, state.position)
    flat = state.flat_tensors()
    if {n: tuple(t.shape) for n, t in flat.items()} != expected:
        raise TensorMismatchError(
            f"this state does not fit the model it is saved for (config "
            f"{model.config.name!r}): expected tensors {expected}, got "
            f"{ {n: tuple(t.shape) for n, t in flat.items()} }"
        )
    tensors: dict[str, Tensor] = {}
    want = model.state_dtypes()
    for name, t in flat.items():
        if t.dtype != want[name]:
            raise TensorMismatchError(f"state tensor {name!r} is {t.dtype}, this model's state "
                                      f"keeps it in {want[name]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"state tensor {name!r} holds NaN or inf; refusing to save a "
                                 f"memory no model can use (reset the session)")
        # own, contiguous CPU copy: a KV cache may view a bigger buffer, and safetensors refuses
        # tensors that share memory (an empty open segment's keys and values may be one tensor)
        tensors[name] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model.fingerprint(),
        "config_name": str(model.config.name),
        "dtype": _dtype_name(model.dtype),
        "position": str(int(state.position)),
        "batch_size": str(state.batch_size),
        "layer_kinds": json.dumps(list(model.config.layers)),
        "payload_sha256": payload_sha256(tensors),
        "created_by": f"newllm {newllm.__version__}",
        "checkpoint_fingerprint": model.checkpoint_fingerprint(),
        "config_fingerprint": config_fingerprint(model.config),
        "device_type": model.device.type,
        "torch_version": torch.__version__,
    }
    if model.weights_dtype != model.dtype:
        meta["weights_dtype"] = _dtype_name(model.weights_dtype)
    if tokenizer_hash is not None:
        meta["tokenizer_hash"] = str(tokenizer_hash)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"memory file metadata must map str to str; got {key!r}: {value!r}")
        if key in RESERVED_KEYS or key == "__metadata__":
            raise ValueError(f"metadata key {key!r} is reserved; reserved keys: {RESERVED_KEYS}")
        meta[key] = value
    meta["metadata_sha256"] = metadata_sha256(meta)
    data = serialize(tensors, meta)
    if struct.unpack("<Q", data[:8])[0] > MAX_HEADER_BYTES:
        raise ValueError(f"memory file header over {MAX_HEADER_BYTES} bytes; use less metadata")
    if path is not None:
        write_atomic(path, data)
    return data


def serialize(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes with a canonical layout: tensors and metadata keys in sorted order,
    compact JSON, header padded with spaces to 8 bytes. The same state always gives the same
    bytes, so an exported file re-exported after an import is identical byte for byte."""
    if sys.byteorder != "little":  # safetensors stores little-endian
        raise RuntimeError("memory files are written on little-endian machines only")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# parsing -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str  # safetensors dtype name
    shape: list[int]
    begin: int  # offsets into the data region
    end: int


@dataclasses.dataclass(frozen=True)
class _Parsed:
    metadata: dict[str, str]
    entries: dict[str, _Entry]
    data: memoryview  # the data region (after the header)
    raw: bytes  # the whole file


def _read_source(source: bytes | bytearray | memoryview | str | Path,
                 max_bytes: int | None) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        size = os.path.getsize(source)
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(f"memory file {str(source)!r} is {size} bytes, over the limit of "
                                f"{max_bytes}")
        data = Path(source).read_bytes()
    else:
        raise TypeError(f"a memory file source is bytes or a path, got {type(source).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(f"memory file is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise NotSafetensorsError(f"header names {key!r} twice; the file is corrupt")
        out[key] = value
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse(source: Any, max_bytes: int | None) -> _Parsed:
    """Check the safetensors framing of a file without trusting any number in it."""
    raw = _read_source(source, max_bytes)
    if not raw:
        raise NotSafetensorsError("the memory file is empty (0 bytes); send the whole file")
    if len(raw) < 8:
        raise TruncatedError(f"the memory file is {len(raw)} bytes, cut off inside its 8-byte "
                             f"header length; send the whole file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES:
        raise NotSafetensorsError(
            f"header length field says {header_len} bytes (a memory file's header is at most "
            f"{MAX_HEADER_BYTES}); this is not a newllm memory file"
        )
    if header_len < 2 or raw[8:9] not in (b"{", b""):
        raise NotSafetensorsError("no JSON header after the length field: not a safetensors file")
    if 8 + header_len > len(raw):
        raise TruncatedError(f"the header needs {header_len} bytes but the file ends after "
                             f"{len(raw) - 8}; the file was cut off, send the whole file")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"),
                            object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, MemoryFileError):
            raise
        raise NotSafetensorsError(f"the header is not valid JSON ({e}); not a safetensors "
                                  f"file") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("the header is not a JSON object: not a safetensors file")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise NotSafetensorsError("__metadata__ must map strings to strings")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if not name or not isinstance(info, dict) or set(info) != {"dtype", "shape",
                                                                   "data_offsets"}:
            raise NotSafetensorsError(f"header entry {name!r} is not a tensor description "
                                      f"(dtype, shape, data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise NotSafetensorsError(f"tensor {name!r} has unknown dtype {dtype!r}; known: "
                                      f"{sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise NotSafetensorsError(f"tensor {name!r} has shape {shape!r}; a shape is a list "
                                      f"of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_uint(o) for o in offsets) or offsets[0] > offsets[1]):
            raise NotSafetensorsError(f"tensor {name!r} has data_offsets {offsets!r}; expected "
                                      f"[begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * DTYPES[dtype][1]  # python int: no overflow
        if offsets[1] - offsets[0] != nbytes:
            raise NotSafetensorsError(
                f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its "
                f"data_offsets span {offsets[1] - offsets[0]}; the header is corrupt"
            )
        entries[name] = _Entry(name, dtype, shape, offsets[0], offsets[1])
    cursor = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != cursor:
            what = "overlaps the previous tensor" if e.begin < cursor else "leaves a gap"
            raise NotSafetensorsError(f"tensor {e.name!r} at bytes {e.begin}..{e.end} {what}; "
                                      f"the header is corrupt")
        cursor = e.end
    available = len(raw) - 8 - header_len
    if max_bytes is not None and 8 + header_len + cursor > max_bytes:
        raise TooLargeError(f"the header describes {cursor} bytes of tensors, over the limit "
                            f"of {max_bytes}")
    if cursor > available:
        raise TruncatedError(f"the tensors need {cursor} bytes but only {available} follow the "
                             f"header; the file was cut off, send the whole file")
    if cursor < available:
        raise NotSafetensorsError(f"{available - cursor} unexpected bytes after the last tensor")
    return _Parsed(meta, entries, memoryview(raw)[8 + header_len:], raw)


def _parse_uint(meta: dict[str, str], key: str, low: int, high: int) -> int:
    value = meta[key]
    if not _DECIMAL.fullmatch(value) or not low <= int(value) <= high:
        raise MetadataError(f"metadata {key!r} is {value[:40]!r}; expected a decimal integer in "
                            f"[{low}, {high}]; the file is corrupt or was edited")
    return int(value)


def _check_metadata(meta: dict[str, str]) -> tuple[int, int, torch.dtype]:
    """Check our keys are there and well formed; returns (position, batch size, dtype)."""
    if meta.get("format") != FORMAT_NAME:
        raise FormatVersionError(
            f"a safetensors file, but not a newllm memory file (metadata format is "
            f"{meta.get('format')!r}, expected {FORMAT_NAME!r}); export memory with save_memory"
        )
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        readable = " and ".join(repr(v) for v in READ_VERSIONS)
        shown = version[:40] if isinstance(version, str) else version  # None: no version at all
        raise FormatVersionError(
            f"memory file format version {shown!r} is not supported (this newllm "
            f"reads versions {readable}); use the newllm version that wrote it"
        )
    missing = [k for k in REQUIRED_KEYS[version] if k not in meta]
    if missing:
        raise MetadataError(f"memory file metadata lacks {missing}; the file is corrupt")
    for key in ("model_fingerprint", "payload_sha256", "metadata_sha256",
                "checkpoint_fingerprint", "config_fingerprint"):
        if key in meta and not _HEX64.fullmatch(meta[key]):
            raise MetadataError(f"metadata {key!r} is not a SHA-256 hex digest (64 lowercase "
                                f"hex digits); the file is corrupt or was edited")
    try:
        kinds = json.loads(meta["layer_kinds"])
    except (ValueError, RecursionError):
        kinds = None
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise MetadataError("metadata 'layer_kinds' is not a JSON list of layer type names")
    dtypes = {_dtype_name(dt): dt for dt, _ in DTYPES.values()}
    for key in ("dtype", "weights_dtype"):
        if key in meta and meta[key] not in dtypes:
            raise MetadataError(f"metadata {key} {meta[key][:40]!r} is not a known dtype")
    position = _parse_uint(meta, "position", 0, MAX_POSITION)
    batch = _parse_uint(meta, "batch_size", 1, MAX_BATCH)
    return position, batch, dtypes[meta["dtype"]]


def _check_metadata_hash(meta: dict[str, str]) -> None:
    """``metadata_sha256``, when the file has one (always from version 2; `_check_metadata`
    saw to that), matches the other entries."""
    claimed = meta.get("metadata_sha256")
    if claimed is not None and claimed != metadata_sha256(meta):
        raise MetadataChecksumError(
            "memory file metadata does not match its metadata_sha256: the header (model, "
            "position or session entries) was corrupted in transit or edited; send it again"
        )


def read_memory_metadata(source: bytes | str | Path, *,
                         max_bytes: int | None = None) -> dict[str, str]:
    """The metadata of a memory file whose framing and metadata are well formed.

    Checks what can be checked without a model: framing, our keys, and the metadata hash (for
    version 2 files; version 1 files have none). Not the tensors' hash or values.
    """
    parsed = _parse(source, max_bytes)
    _check_metadata(parsed.metadata)
    _check_metadata_hash(parsed.metadata)
    return dict(parsed.metadata)


# loading -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Conversion:
    """A state converted on load: written at one precision/device, continued at another."""

    from_dtype: str
    to_dtype: str
    from_device: str | None  # None: the file does not say (written before it was recorded)
    to_device: str

    from_weights: str | None = None  # the linear weights' dtype where it is not the dtype's
    to_weights: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"from": {"dtype": self.from_dtype, "device": self.from_device},
                               "to": {"dtype": self.to_dtype, "device": self.to_device}}
        for end, weights in (("from", self.from_weights), ("to", self.to_weights)):
            if weights is not None:
                out[end]["weights_dtype"] = weights
        return out

    def __str__(self) -> str:
        where = f" on {self.from_device}" if self.from_device else ""
        return (f"converted from {_precision(self.from_dtype, self.from_weights)}{where} to "
                f"{_precision(self.to_dtype, self.to_weights)} on {self.to_device}")


def _precision(dtype: str, weights: str | None) -> str:
    return dtype if weights is None else f"{dtype} with {weights} weights"


def _check_model(meta: dict[str, str], model: Any, tokenizer_hash: str | None,
                 strict: bool) -> Conversion | None:
    """The file belongs to this model (None) or to this checkpoint at another precision (the
    conversion to make); anything else is refused, saying which part differs."""
    conversion = None
    if meta["model_fingerprint"] != model.fingerprint():
        # same checkpoint at another precision (at the same one, the fingerprints would agree):
        # the state's dtype differs, or the linear weights' (half weights)
        ours = (_dtype_name(model.dtype), _dtype_name(model.weights_dtype))
        theirs = (meta["dtype"], meta.get("weights_dtype", meta["dtype"]))
        same_checkpoint = (meta.get("checkpoint_fingerprint") == model.checkpoint_fingerprint()
                           and theirs != ours)
        if not same_checkpoint:
            raise ModelMismatchError(_mismatch(meta, model))
        conversion = Conversion(meta["dtype"], ours[0], meta.get("device_type"),
                                model.device.type, meta.get("weights_dtype"),
                                None if ours[1] == ours[0] else ours[1])
        if strict:
            raise ConversionRefusedError(
                f"this memory is of this checkpoint but was written in "
                f"{_precision(meta['dtype'], conversion.from_weights)} "
                f"({meta.get('device_type') or 'device not recorded'}) and this model runs "
                f"in {_precision(ours[0], conversion.to_weights)} ({model.device.type}); "
                f"strict moves refuse conversions (drop strict / --strict-moves to convert it)")
    theirs_tok = meta.get("tokenizer_hash")
    if tokenizer_hash is not None and theirs_tok is not None and theirs_tok != tokenizer_hash:
        raise TokenizerMismatchError(
            f"this memory was written with another tokenizer ({theirs_tok[:12]}..., this one "
            f"{tokenizer_hash[:12]}...); its token ids would mean other text here"
        )
    return conversion


def _mismatch(meta: dict[str, str], model: Any) -> str:
    """Why a file of another checkpoint is refused: what differs, as far as the file says."""
    theirs = f"config {meta.get('config_name')!r}, layers {meta['layer_kinds']}"
    ours = f"config {model.config.name!r}, layers {json.dumps(list(model.config.layers))}"
    same_config = meta.get("config_fingerprint") == config_fingerprint(model.config) \
        if "config_fingerprint" in meta else theirs == ours
    if not same_config:
        why = f"a model with another config ({theirs}; this one: {ours})"
    elif "checkpoint_fingerprint" in meta:
        why = ("the same config with other weights (another checkpoint: another training run "
               "or step)")
    else:  # an older file: no checkpoint identity, so precision cannot be told from weights
        why = (f"the same architecture with different weights, or this checkpoint at another "
               f"precision ({meta['dtype']}; this model: {_dtype_name(model.dtype)}) by a "
               f"newllm that did not record the checkpoint")
    return (f"this memory was written by {why} (fingerprint {meta['model_fingerprint'][:12]}..., "
            f"this model {model.fingerprint()[:12]}...); load it into the checkpoint that "
            f"wrote it")


def _check_tensors(parsed: _Parsed, model: Any, position: int, batch: int,
                   dtype: torch.dtype, converting: bool) -> None:
    expected = model.state_shapes(batch, position)
    missing = sorted(set(expected) - set(parsed.entries))
    extra = sorted(set(parsed.entries) - set(expected))
    if missing or extra:
        raise TensorMismatchError(
            f"memory file tensors do not match the model's state: missing {missing}, "
            f"unexpected {extra}"
        )
    if dtype != model.dtype and not converting:  # this very model's fingerprint, other dtype
        raise TensorMismatchError(f"memory file dtype is {dtype}, the model runs in "
                                  f"{model.dtype}; save the state for a {dtype} model")
    # what the model that wrote it keeps: this model, or this checkpoint in ``dtype``
    want = {n: ST_NAME.get(dt) for n, dt in model.state_dtypes(dtype).items()}
    for name, shape in expected.items():
        e = parsed.entries[name]
        if tuple(e.shape) != tuple(shape):
            raise TensorMismatchError(
                f"tensor {name!r} has shape {tuple(e.shape)}, but after {position} tokens with "
                f"batch {batch} this model's state has {tuple(shape)}"
            )
        if e.dtype != want[name]:
            raise TensorMismatchError(f"tensor {name!r} is {e.dtype}, this model's state keeps "
                                      f"it in {want[name]}")


MAX_ABS_VALUE = 1e15  # far above any honest state (sums of O(10) values over < 2**24 tokens)
# normalisers and token counts of memory layers, the pointer's masses, its features and token
# ids of the positions still pending
NON_NEGATIVE = ("z", "coarse_z", "count", "mass", "span_mass", "span_z", "span_keys",
                "span_queries", "span_tokens")


def _check_values(tensors: Mapping[str, Tensor], position: int) -> None:
    """Values an honest state can hold: bounded, normalisers and counts >= 0, counts whole and
    at most the tokens seen. The fingerprint and payload hash catch accidents (another model,
    damage in transit), not a forger who copies them; these checks bound what a forged file can
    do, and the server isolates a session whose memory still misbehaves."""
    for name, t in tensors.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if float(t.abs().max()) > MAX_ABS_VALUE:
            raise ValueRangeError(f"tensor {name!r} holds values beyond {MAX_ABS_VALUE:g}; no "
                                  f"state this model writes looks like that")
        field = name.rsplit(".", 1)[-1]
        if field in NON_NEGATIVE and float(t.min()) < 0:
            raise ValueRangeError(f"tensor {name!r} holds negative values; it is a normaliser "
                                  f"or count and can only grow from zero")
        if field == "count":
            if not torch.equal(t, t.round()):
                raise ValueRangeError(f"tensor {name!r} must hold whole token counts")
            if float(t.sum(dim=-1).max()) > position:
                raise ValueRangeError(f"tensor {name!r} counts more tokens than the "
                                      f"{position} the file says were seen")


def _check_token_ids(tensors: Mapping[str, Tensor], vocab_size: int) -> None:
    """Token ids a state keeps (the pointer's pairs not yet written) are whole and in the
    vocabulary: they index the masses."""
    t = tensors.get("pointer.span_tokens")
    if t is None or not t.numel():
        return
    if not torch.equal(t, t.round()) or float(t.min()) < 0 or float(t.max()) >= vocab_size:
        raise ValueRangeError(f"tensor 'pointer.span_tokens' must hold token ids, whole numbers "
                              f"in [0, {vocab_size})")


def load_memory(source: bytes | str | Path, model: Any, *, tokenizer_hash: str | None = None,
                max_bytes: int | None = None, strict: bool = False) -> ModelState:
    """A new `ModelState` for ``model`` from a memory file, after checking everything.

    ``source`` is the file's bytes or its path; ``max_bytes`` bounds the file size (checked
    before reading a path). Order of checks: framing, metadata (version "1" or "2", keys
    well formed), model fingerprint (or the checkpoint's, for a file of this checkpoint at
    another precision: converted, unless ``strict``), tokenizer hash (when both sides know
    one), tensor names, dtypes, shapes, payload hash, finiteness, value ranges, and last the
    metadata hash (so that a file whose only fault is edited metadata gets
    `MetadataChecksumError`, and any other fault its own error). Nothing is changed: the model
    is only read, and the state is new. `load_memory_report` also says what was converted.
    """
    return load_memory_report(source, model, tokenizer_hash=tokenizer_hash,
                              max_bytes=max_bytes, strict=strict).state


@dataclasses.dataclass(frozen=True)
class LoadedMemory:
    """What `load_memory_report` found: the state, and the conversion made (None: none)."""

    state: ModelState
    conversion: Conversion | None
    metadata: dict[str, str]


def load_memory_report(source: bytes | str | Path, model: Any, *,
                       tokenizer_hash: str | None = None, max_bytes: int | None = None,
                       strict: bool = False) -> LoadedMemory:
    """`load_memory`, with the file's metadata and the conversion it took (see the module
    docstring: moves across precision and device)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    parsed = _parse(source, max_bytes)
    position, batch, dtype = _check_metadata(parsed.metadata)
    conversion = _check_model(parsed.metadata, model, tokenizer_hash, strict)
    _check_tensors(parsed, model, position, batch, dtype, conversion is not None)
    digest = _payload_hash([(e.name, e.dtype, e.shape, parsed.data[e.begin:e.end])
                            for e in parsed.entries.values()])
    if digest != parsed.metadata["payload_sha256"]:
        raise ChecksumError("memory file tensors do not match their payload_sha256: the file "
                            "was corrupted in transit or edited; send it again")
    try:
        tensors = st_load(parsed.raw)
    except SafetensorError as e:  # safetensors' own check; ours should catch everything first
        raise NotSafetensorsError(f"safetensors refused the file: {e}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"tensor {name!r} holds NaN or inf; a memory like this would "
                                 f"poison every later token; refusing it")
    _check_values(tensors, position)
    _check_token_ids(tensors, model.config.vocab_size)
    _check_metadata_hash(parsed.metadata)
    want = model.state_dtypes()
    tensors = {n: t.to(device=model.device, dtype=want[n]) for n, t in tensors.items()}
    if conversion is not None:
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"tensor {name!r} holds values that {conversion.to_dtype} "
                                     f"cannot represent (converting from "
                                     f"{conversion.from_dtype}); continue it at the precision "
                                     f"that wrote it")
    template = model.init_state(batch)
    layers = []
    for i, layer_state in enumerate(template.layers):
        prefix = f"layers.{i}."
        fields = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        layers.append(dataclasses.replace(layer_state, **fields))
    pointer = None
    if template.pointer is not None:
        pointer = dataclasses.replace(template.pointer, **{
            n[len("pointer."):]: t for n, t in tensors.items() if n.startswith("pointer.")})
    state = ModelState(position, tuple(layers), tensors.get("context.last"), pointer)
    return LoadedMemory(state, conversion, dict(parsed.metadata))
