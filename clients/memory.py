"""Memory files on the client side: read a safetensors header and check checksums, stdlib only.

A session's memory file is a safetensors file: 8 bytes of little-endian header length, a JSON
header (tensor name -> dtype, shape, data_offsets, plus ``__metadata__``, a string map), then
the tensor bytes. newllm's metadata includes ``payload_sha256``: SHA-256 over each tensor's
``name|dtype|shape|nbytes|`` followed by its raw bytes, in name order (see
``newllm.memory_file``). Recomputing it here proves that the tensors arrived unchanged without
importing torch; the server checks it again when the file is uploaded. From format version 2 the
metadata also carries ``metadata_sha256``, the SHA-256 of the other metadata entries as compact
sorted ASCII JSON, which covers the header (and through ``payload_sha256`` the tensors) too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from clients.errors import IntegrityError

MAX_HEADER_BYTES = 1 << 20  # newllm refuses larger headers, and so does the client
PAYLOAD_HEADER = "X-Newllm-Payload-Sha256"  # the export route's copy of payload_sha256
STORE_HEADER = "X-Newllm-Store-Id"  # on every response: which session store the server uses


def same_store(headers: Any, target_store: str | None) -> bool:
    """Whether a download's headers name the same session store as ``target_store``."""
    source_store = headers.get(STORE_HEADER)
    return bool(source_store) and source_store == target_store


@dataclass(frozen=True)
class MemoryFileInfo:
    """What a memory file's header says (``metadata`` is safetensors' ``__metadata__``)."""

    size: int  # bytes of the whole file
    file_sha256: str  # SHA-256 of the whole file
    metadata: dict[str, str]
    tensors: dict[str, dict[str, Any]] = field(repr=False)  # name -> dtype, shape, data_offsets

    @property
    def payload_sha256(self) -> str | None:
        return self.metadata.get("payload_sha256")

    @property
    def tokens_seen(self) -> int | None:
        value = self.metadata.get("position", "")
        return int(value) if value.isdigit() else None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (for ``--json`` output)."""
        keys = ("format", "format_version", "config_name", "model_fingerprint", "dtype",
                "session.kind", "session.turns")
        return {"bytes": self.size, "file_sha256": self.file_sha256,
                "payload_sha256": self.payload_sha256, "tokens_seen": self.tokens_seen,
                "tensors": len(self.tensors),
                **{k: self.metadata[k] for k in keys if k in self.metadata}}


def _header(data: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the offset where tensor data starts."""
    if len(data) < 8:
        raise IntegrityError(f"not a memory file: {len(data)} bytes is shorter than the 8-byte "
                             "safetensors header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER_BYTES:
        raise IntegrityError(f"not a memory file: its header claims {n} bytes (at most "
                             f"{MAX_HEADER_BYTES})")
    if 8 + n > len(data):
        raise IntegrityError(f"the memory file is cut off: {len(data)} bytes, but its header "
                             f"alone needs {8 + n}")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"not a memory file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise IntegrityError("not a memory file: its header is not a JSON object")
    return header, 8 + n


def inspect(data: bytes | memoryview) -> MemoryFileInfo:
    """Read a memory file's header (no tensor is decoded); raises `IntegrityError` if malformed."""
    header, _ = _header(data)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise IntegrityError("not a memory file: __metadata__ is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return MemoryFileInfo(size=len(data), file_sha256=hashlib.sha256(data).hexdigest(),
                          metadata={str(k): str(v) for k, v in meta.items()}, tensors=tensors)


def payload_sha256(data: bytes | memoryview) -> str:
    """Recompute newllm's ``payload_sha256`` from a memory file's tensor bytes."""
    header, start = _header(data)
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), [int(s) for s in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"not a memory file: tensor {name!r} has a malformed header "
                                 "entry") from None
        if not 0 <= begin <= end or start + end > len(data):
            raise IntegrityError(f"the memory file is cut off or corrupt: tensor {name!r} "
                                 f"lies outside its {len(data)} bytes")
        entries.append((name, dtype, shape, data[start + begin:start + end]))
    h = hashlib.sha256()
    for name, dtype, shape, raw in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}|{dtype}|{','.join(map(str, shape))}|{len(raw)}|".encode())
        h.update(raw)
    return h.hexdigest()


def metadata_sha256(metadata: dict[str, str]) -> str:
    """Recompute newllm's ``metadata_sha256`` (format version 2) from a file's metadata."""
    entries = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    canonical = json.dumps(entries, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def verify(data: bytes | memoryview, expected_payload: str | None = None) -> MemoryFileInfo:
    """Check a memory file end to end; returns its header info or raises `IntegrityError`.

    Checks: the header parses; it carries ``payload_sha256``; that value equals
    ``expected_payload`` (the export route's header) when given; the tensors' bytes hash to
    it; and the metadata hashes to ``metadata_sha256`` (required from format version 2, checked
    whenever present). A file that passes is exactly what the source server wrote.
    """
    info = inspect(data)
    claimed_meta = info.metadata.get("metadata_sha256")
    if claimed_meta is None and info.metadata.get("format_version", "1") != "1":
        raise IntegrityError("the memory file has no metadata_sha256 in its metadata (format "
                             f"version {info.metadata.get('format_version')!r} needs one); its "
                             "header was altered")
    if claimed_meta is not None and metadata_sha256(info.metadata) != claimed_meta:
        raise IntegrityError("the memory file's metadata does not hash to its metadata_sha256; "
                             "the header was damaged in transfer or edited")
    claimed = info.payload_sha256
    if not claimed:
        raise IntegrityError("the memory file has no payload_sha256 in its metadata; it was not "
                             "written by newllm, or its header was altered")
    if expected_payload is not None and expected_payload.lower() != claimed.lower():
        raise IntegrityError(f"the memory file's payload_sha256 {claimed[:16]}... differs from "
                             f"the one the server sent ({expected_payload[:16]}...); the "
                             "download was altered on the way")
    actual = payload_sha256(data)
    if actual != claimed.lower():
        raise IntegrityError(f"the memory file's tensors hash to {actual[:16]}..., not to its "
                             f"payload_sha256 {claimed[:16]}...; the bytes were damaged in "
                             "transfer")
    return info
