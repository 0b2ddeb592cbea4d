"""Hostile memory files: a seeded generator, and a fuzz run against `load_memory` or a server.

`hostile_files(good, others=..., seed=...)` turns one valid memory file into hundreds of files
that no loader may accept: cut at every region boundary, length fields past the end, flipped
bits in the header and the data, huge declared shapes, duplicate/overlapping/gapped offsets,
unknown and wrong dtypes, NaN/inf and impossible values, missing/extra/renamed tensors,
metadata with another fingerprint, format or version, metadata edited behind its
``metadata_sha256`` or with that hash missing or malformed, and valid files of other models.
Each `Case` says which `MemoryFileError` codes would name its problem (empty: any refusal) and
whether it may load at all (a flipped bit in an informative header field such as
``created_by`` changes nothing that matters; then the state must be the original, bit for bit).
One case is no attack: ``compat:v1`` is the file as format version 1 wrote it (no metadata
hash), which must load, so that sessions saved by earlier versions keep working.

Cases that change metadata to test one check recompute ``metadata_sha256`` (`with_meta`,
`retensor`), so that check, not the metadata hash, is what refuses them; the ``meta-hash``
cases leave it stale on purpose.

`hostile_session_metadata(good)` gives files `load_memory` accepts (their tensors are fine) but
whose ``session.*`` metadata a server must refuse when they are uploaded.

    python scripts/fuzz_memory.py --seed 0 --flips 2000             # load_memory in-process
    python scripts/fuzz_memory.py --url http://127.0.0.1:8000 --key KEY --cases 300

The second form needs a server of ``tiny-infini`` (the default ``--checkpoint``); it uploads to
fresh session ids and to one victim session, and checks the victim's file never changes.
Tests import this module by path (``tests/test_hardening_memory.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from newllm.memory_file import (  # noqa: E402  (after the path set-up, for direct runs)
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_POSITION,
    RESERVED_KEYS,
    MemoryFileError,
    load_memory,
    metadata_sha256,
    payload_sha256,
    save_memory,
    serialize,
)

ANY = ()  # Case.codes: any MemoryFileError will do


@dataclass(frozen=True)
class Case:
    name: str  # "<category>:<detail>", e.g. "truncate:header_end+1"
    data: bytes
    codes: tuple[str, ...] = ANY  # the error codes that name the problem; () = any refusal
    may_load: bool = False  # allowed to load, if the state is identical to the original
    must_load: bool = False  # a valid file (implies may_load): any refusal but size is a failure

    @property
    def category(self) -> str:
        return self.name.split(":", 1)[0]


# file surgery -------------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header dict, data region) of a well-formed safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: Any, payload: bytes, *, raw_header: bytes | None = None) -> bytes:
    """A file from a header (any JSON value, or raw bytes) and a data region."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + payload


def _copy(header: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(header))


def _rehash_meta(meta: dict[str, Any], original: dict[str, Any],
                 changes: dict[str, Any]) -> None:
    """Recompute ``metadata_sha256`` after ``changes`` if the original file had one and the
    changes leave it alone (values that are not strings: left as they are, the file is bad)."""
    if ("metadata_sha256" in original and "metadata_sha256" not in changes
            and all(isinstance(v, str) for v in meta.values())):
        meta["metadata_sha256"] = metadata_sha256(meta)


def with_meta(good: bytes, *, rehash: bool = True, **changes: Any) -> bytes:
    """``good`` with metadata entries changed (None removes one); the tensors untouched.

    ``rehash``: recompute ``metadata_sha256`` (unless ``changes`` names it), so that only the
    change itself can be what a loader refuses; False leaves it stale."""
    header, payload = split(good)
    original = dict(header["__metadata__"])
    for key, value in changes.items():
        if value is None:
            header["__metadata__"].pop(key, None)
        else:
            header["__metadata__"][key] = value
    if rehash:
        _rehash_meta(header["__metadata__"], original, changes)
    return join(header, payload)


def retensor(good: bytes, change: Any, *, rehash: bool = True, **meta_changes: Any) -> bytes:
    """``good`` with its tensors changed by ``change(dict)``, payload hash recomputed (and then
    the metadata hash, unless ``meta_changes`` names it), so only the change itself can be what
    a loader refuses. Written as `save_memory` writes (canonical, compact header)."""
    from safetensors.torch import load as st_load

    tensors = st_load(good)
    change(tensors)
    original = dict(split(good)[0]["__metadata__"])
    meta = dict(original)
    if rehash:
        meta["payload_sha256"] = payload_sha256(tensors)
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    if rehash:
        _rehash_meta(meta, original, meta_changes)
    return serialize(tensors, meta)


# the generator ------------------------------------------------------------------------------
def hostile_files(good: bytes, *, others: Sequence[bytes] = (), seed: int = 0,
                  flips: int = 48) -> Iterator[Case]:
    """Hostile variants of the valid memory file ``good`` (see the module docstring).

    ``others``: valid memory files of other models (see `foreign_files`), each must be refused
    as ``model_mismatch``. ``flips``: random bit flips in each of header and data. Same
    arguments, same cases, in the same order.
    """
    rng = random.Random(seed)
    header, payload = split(good)
    n = struct.unpack("<Q", good[:8])[0]
    end = 8 + n  # where the data region starts
    names = sorted(k for k in header if k != "__metadata__")
    meta = header["__metadata__"]
    f32 = [k for k in names if header[k]["dtype"] == "F32" and 0 not in header[k]["shape"]]

    # framing ------------------------------------------------------------------------------
    yield Case("framing:empty", b"", ("not_safetensors",))
    for cut in range(1, 8):
        yield Case(f"truncate:{cut}", good[:cut], ("truncated",))
    cuts = {8, 9, end // 2, end - 1, end, end + 1, len(good) - 1}
    for k in names:
        begin, stop = header[k]["data_offsets"]
        cuts |= {end + begin - 1, end + begin, end + begin + 1, end + stop - 1, end + stop}
    for cut in sorted(c for c in cuts if 8 <= c < len(good)):
        yield Case(f"truncate:{cut}", good[:cut], ("truncated",))
    body = good[8:]
    for value, codes in [(n + 1, ANY), (n + 8, ANY), (len(good) - 8, ANY),
                         (len(good) - 7, ("truncated",)), (len(good) + 4096, ("truncated",)),
                         (MAX_HEADER_BYTES + 1, ("not_safetensors",)),
                         (2**63, ("not_safetensors",)), (2**64 - 1, ("not_safetensors",)),
                         (0, ("not_safetensors",)), (1, ("not_safetensors",)), (n - 1, ANY),
                         (n - 8, ANY)]:
        yield Case(f"header_length:{value}", struct.pack("<Q", value) + body, codes)
    for what, raw in [("list", b"[1, 2]"), ("number", b"12345678"), ("string", b'"abc"'),
                      ("null", b"null"), ("not-json", b"{not json}"), ("nul", b"{\0\0\0}"),
                      ("bom", b"\xef\xbb\xbf{}"), ("latin1", b'{"\xe9": 1}'),
                      ("deep-array", b"{" + b'"a":' + b"[" * 60_000 + b"]" * 60_000 + b"}"),
                      ("deep-object", b'{"a":' * 30_000 + b"1" + b"}" * 30_000)]:
        yield Case(f"framing:header-{what}", join(None, payload, raw_header=raw))
    dup = json.dumps(header).encode()[:-1] + b', "__metadata__": {}}'
    yield Case("framing:duplicate-metadata", join(None, payload, raw_header=dup),
               ("not_safetensors",))
    dup = json.dumps(header).encode()[:-1] + b', "%s": %s}' % (
        names[0].encode(), json.dumps(header[names[0]]).encode())
    yield Case("framing:duplicate-tensor", join(None, payload, raw_header=dup),
               ("not_safetensors",))
    yield Case("framing:trailing-bytes", good + b"\0" * 8, ("not_safetensors",))
    yield Case("framing:header-only", join(header, b""), ("truncated",))
    for size in (9, 100, 4096, len(good)):
        yield Case(f"framing:random-{size}", rng.randbytes(size))
    yield Case("framing:pickle", b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01x"
               b"\x94K\x01s.", ANY)
    yield Case("framing:zip", b"PK\x03\x04" + rng.randbytes(200), ANY)
    yield Case("framing:plain-safetensors", join({n_: header[n_] for n_ in names}, payload),
               ("format_version",))

    # tensor entries -----------------------------------------------------------------------
    def entry(name: str, **change: Any) -> bytes:
        h = _copy(header)
        h[name].update(change)
        return join(h, payload)

    k0 = names[0]
    big = [10**6, 10**6, 10**6]
    yield Case("shape:huge-consistent", join({"__metadata__": meta, k0: {
        "dtype": "F32", "shape": big, "data_offsets": [0, 4 * 10**18]}}, b"\0" * 64),
        ("truncated", "too_large"))
    yield Case("shape:huge-inconsistent", join({"__metadata__": meta, k0: {
        "dtype": "F32", "shape": big, "data_offsets": [0, 64]}}, b"\0" * 64),
        ("not_safetensors",))
    yield Case("shape:2**64-elements", entry(k0, shape=[2**32, 2**32]), ("not_safetensors",))
    for bad in ([-1, 4], [1.5], ["4"], [True, 1], [[1]], None, "1,4", [1] * 1000, []):
        yield Case(f"shape:{json.dumps(bad)[:24]}", entry(k0, shape=bad))
    shape = header[k0]["shape"]
    yield Case("shape:same-bytes-other-shape",
               entry(k0, shape=[1] * (len(shape) - 1) + [int(torch.tensor(shape).prod())]),
               ("tensor_mismatch",))
    b0, e0 = header[k0]["data_offsets"]
    for what, offsets in [("reversed", [e0, b0]), ("negative", [-4, e0 - 4]),
                          ("floats", [float(b0), float(e0)]), ("three", [b0, e0, e0]),
                          ("strings", [str(b0), str(e0)]), ("bools", [False, True]),
                          ("past-end", [b0 + len(payload), e0 + len(payload)]),
                          ("huge", [2**64, 2**64 + e0 - b0])]:
        yield Case(f"offsets:{what}", entry(k0, data_offsets=offsets), ("not_safetensors",))
    same = [k for k in names if k != k0 and header[k]["data_offsets"][1] -
            header[k]["data_offsets"][0] == e0 - b0]
    if same:
        yield Case("offsets:duplicate", entry(same[0], data_offsets=[b0, e0]),
                   ("not_safetensors",))
        h = _copy(header)
        h[k0]["data_offsets"], h[same[0]]["data_offsets"] = (h[same[0]]["data_offsets"],
                                                             h[k0]["data_offsets"])
        yield Case("offsets:swapped", join(h, payload), ("checksum_mismatch",))
    h = _copy(header)
    for k in names:
        h[k]["data_offsets"] = [o + 8 for o in h[k]["data_offsets"]]
    yield Case("offsets:gap", join(h, b"\0" * 8 + payload), ("not_safetensors",))
    last = max(names, key=lambda k: header[k]["data_offsets"][0])
    lb, le = header[last]["data_offsets"]
    if le - lb >= 8:
        yield Case("offsets:overlap", entry(last, data_offsets=[lb - 4, le - 4]),
                   ("not_safetensors",))
    for what, change in [("extra-key", {"extra": 1}), ("not-a-dict", None)]:
        h = _copy(header)
        if change is None:
            h[k0] = [header[k0]["dtype"], header[k0]["shape"]]
        else:
            h[k0].update(change)
        yield Case(f"entry:{what}", join(h, payload), ("not_safetensors",))
    h = _copy(header)
    h[""] = h.pop(k0)
    yield Case("entry:empty-name", join(h, payload), ("not_safetensors",))

    # dtypes --------------------------------------------------------------------------------
    for bad in ("F99", "f32", "", "float32", 32, None, ["F32"]):
        yield Case(f"dtype:{bad!r}", entry(k0, dtype=bad), ("not_safetensors",))
    mismatch = ("tensor_mismatch", "checksum_mismatch")
    for dtype, scale in [("I32", 1), ("U32", 1), ("F16", 2), ("BF16", 2), ("I16", 2),
                         ("F64", 0.5), ("I64", 0.5), ("C64", 0.5), ("U8", 4), ("BOOL", 4),
                         ("F8_E4M3", 4)]:
        for k in f32[:2]:
            s = list(header[k]["shape"])
            if s[-1] * scale != int(s[-1] * scale):
                continue
            s[-1] = int(s[-1] * scale)
            yield Case(f"dtype:{k}-as-{dtype}", entry(k, dtype=dtype, shape=s), mismatch)
    yield Case("dtype:all-float16", retensor(good, lambda t: t.update(
        {k: v.half() for k, v in t.items()}), dtype="float16"), ("tensor_mismatch",))
    yield Case("dtype:all-float64", retensor(good, lambda t: t.update(
        {k: v.double() for k, v in t.items()}), dtype="float64"), ("tensor_mismatch",))
    yield Case("dtype:meta-only", with_meta(good, dtype="bfloat16"), ("tensor_mismatch",))

    # values (hash kept right: only the values are wrong) -----------------------------------
    def poison(name: str, value: float, where: int) -> Any:
        def change(t: dict[str, torch.Tensor]) -> None:
            flat = t[name].view(-1)
            flat[where % flat.numel()] = value
        return change

    for k in f32:
        for value in (float("nan"), float("inf"), float("-inf")):
            yield Case(f"values:{k}={value}", retensor(good, poison(k, value, rng.randrange(
                10**6))), ("non_finite",))
        yield Case(f"values:{k}=3e38", retensor(good, poison(k, 3e38, 0)), ("out_of_range",))
    for k in f32:
        if k.endswith((".z", ".coarse_z")):
            yield Case(f"values:{k}<0", retensor(good, poison(k, -1.0, 1)), ("out_of_range",))

    # tensor set ----------------------------------------------------------------------------
    for k in names:
        yield Case(f"tensors:missing-{k}", retensor(good, lambda t, k=k: t.pop(k)),
                   ("tensor_mismatch",))
    for extra in ("layers.0.bogus", "layers.99.k", "context.last", "x"):
        yield Case(f"tensors:extra-{extra}", retensor(good, lambda t, e=extra: t.update(
            {e: torch.zeros(1, 4)})), ("tensor_mismatch",))

    def renamed(t: dict[str, torch.Tensor]) -> None:
        t[k0 + "_"] = t.pop(k0)
    yield Case("tensors:renamed", retensor(good, renamed), ("tensor_mismatch",))

    def longer(t: dict[str, torch.Tensor]) -> None:
        t[k0] = torch.cat((t[k0], t[k0][..., :1]), -1)
    yield Case("tensors:longer", retensor(good, longer), ("tensor_mismatch",))

    def batch2(t: dict[str, torch.Tensor]) -> None:
        t.update({k: torch.cat((v, v)) for k, v in t.items()})
    yield Case("tensors:batch-2-meta-1", retensor(good, batch2), ("tensor_mismatch",))
    yield Case("tensors:none", retensor(good, lambda t: t.clear()), ("tensor_mismatch",))

    # metadata ------------------------------------------------------------------------------
    fp = meta["model_fingerprint"]
    other_fp = fp[::-1] if fp[::-1] != fp else "0" * 64
    bad_meta: list[tuple[str, Any, tuple[str, ...]]] = [
        ("format", None, ("format_version",)), ("format", "safetensors", ("format_version",)),
        ("format", "", ("format_version",)),
        ("format_version", None, ("format_version",)),
        ("model_fingerprint", other_fp, ("model_mismatch",)),
        ("model_fingerprint", fp.upper(), ("bad_metadata",)),
        ("model_fingerprint", fp[:-1], ("bad_metadata",)),
        ("model_fingerprint", None, ("bad_metadata",)),
        ("tokenizer_hash", "0" * 64, ("tokenizer_mismatch",)),
        ("payload_sha256", "0" * 64, ("checksum_mismatch",)),
        ("payload_sha256", None, ("bad_metadata",)),
        ("position", str(int(meta["position"]) + 1), ("tensor_mismatch",)),
        ("position", str(MAX_POSITION + 1), ("bad_metadata",)),
        ("batch_size", "2", ("tensor_mismatch",)),
        ("batch_size", "65537", ("bad_metadata",)),
        ("dtype", "float99", ("bad_metadata",)),
        ("layer_kinds", "infini", ("bad_metadata",)),
        ("layer_kinds", "[1, 2]", ("bad_metadata",)),
        ("layer_kinds", "[" * 10_000, ("bad_metadata",)),
    ]
    for version in ("0", "", "1.0", " 1", "01", str(int(FORMAT_VERSION) + 1), "v1"):
        bad_meta.append(("format_version", version, ("format_version",)))
    for value in ("-1", "3.5", "", "9" * 40, "0x25", "37 ", "1e3", "٣", "²"):
        bad_meta.append(("position", value, ("bad_metadata",)))
    for value in ("0", "two", "-1", "1.0"):
        bad_meta.append(("batch_size", value, ("bad_metadata",)))
    for key, value, codes in bad_meta:
        yield Case(f"meta:{key}={str(value)[:20]!r}", with_meta(good, **{key: value}), codes)
    h = _copy(header)
    del h["__metadata__"]
    yield Case("meta:absent", join(h, payload), ("format_version",))
    for what, value in [("list", ["a"]), ("string", "x"), ("int-value", {**meta, "position": 37}),
                        ("null-value", {**meta, "dtype": None})]:
        h = _copy(header)
        h["__metadata__"] = value
        yield Case(f"meta:{what}", join(h, payload), ("not_safetensors",))
    yield Case("meta:over-1MiB", with_meta(good, note="x" * (MAX_HEADER_BYTES + 1)),
               ("not_safetensors",))

    # metadata hash (format version 2) -------------------------------------------------------
    if "metadata_sha256" in meta:
        stale = ("metadata_checksum",)  # edits only the metadata hash can see
        edits: list[tuple[str, Any]] = [
            ("created_by", "newllm 0.0.0"), ("config_name", "tiny-pythia"),
            ("config_name", None), ("tokenizer_hash", None), ("note", "added"),
            ("format_version", "1"),  # a version 2 file relabelled: the hash covers the version
        ]
        edits += [(key, value + "0" if value else "0") for key, value in sorted(meta.items())
                  if key not in RESERVED_KEYS]  # the caller's entries (a server's session.*)
        for key, value in edits:
            if value is None and key not in meta:
                continue
            yield Case(f"meta-hash:stale-{key}={str(value)[:20]!r}",
                       with_meta(good, rehash=False, **{key: value}), stale)
        digest = meta["metadata_sha256"]
        other = digest[::-1] if digest[::-1] != digest else "0" * 64
        yield Case("meta-hash:wrong", with_meta(good, metadata_sha256=other), stale)
        for what, value in [("missing", None), ("upper", digest.upper()), ("short", digest[:-1]),
                            ("long", digest + "0"), ("not-hex", "g" * 64), ("empty", ""),
                            ("spaced", f" {digest}")]:
            yield Case(f"meta-hash:{what}", with_meta(good, metadata_sha256=value),
                       ("bad_metadata",))
        yield Case("meta-hash:payload-hash-first", retensor(
            good, lambda t: None, payload_sha256="0" * 64, metadata_sha256=digest),
            ("checksum_mismatch",))  # the payload hash is checked first: its own code

    # version 1 files (before metadata_sha256) still load ------------------------------------
    yield Case("compat:v1", retensor(good, lambda t: None, format_version="1",
                                     metadata_sha256=None), may_load=True, must_load=True)

    # other models --------------------------------------------------------------------------
    for i, other in enumerate(others):
        yield Case(f"foreign:{i}", other, ("model_mismatch",))

    # bit flips -----------------------------------------------------------------------------
    for region, low, high in (("flip-length", 0, 8), ("flip-header", 8, end),
                              ("flip-data", end, len(good))):
        count = min(16 if region == "flip-length" else flips, (high - low) * 8)
        for where in rng.sample(range(low * 8, high * 8), count):  # distinct bits
            at, bit = divmod(where, 8)
            data = bytearray(good)
            data[at] ^= 1 << bit
            codes = ("checksum_mismatch",) if region == "flip-data" else ANY
            yield Case(f"{region}:{at}^{1 << bit}", bytes(data), codes,
                       may_load=region == "flip-header")


def hostile_session_metadata(good: bytes) -> Iterator[Case]:
    """Files with sound tensors whose ``session.*`` metadata a server must refuse (400).

    `load_memory` accepts all of them (metadata beyond its own keys is not its business)."""
    chain = "0" * 64
    base = {"session.kind": "chat", "session.count": "1", "session.turns": "1",
            "session.chain": chain, "session.first": chain, "session.open_reply": "0"}
    for what, change in [
        ("kind", {"session.kind": "binary"}), ("count", {"session.count": "-1"}),
        ("count-huge", {"session.count": "9" * 30}), ("count-float", {"session.count": "1.0"}),
        ("chain", {"session.chain": "zz"}), ("open_reply", {"session.open_reply": "2"}),
        ("missing-chain", {"session.chain": None}),
        ("first-vs-count", {"session.first": "", "session.count": "3"}),
        ("lengths-not-json", {"session.kind": "text", "session.lengths": "[1,"}),
        ("lengths-negative", {"session.kind": "text", "session.lengths": "[-1]"}),
        ("lengths-too-many", {"session.kind": "text", "session.lengths": "[1, 2, 3]"}),
        ("lengths-deep", {"session.kind": "text",
                          "session.lengths": "[" * 100_000 + "]" * 100_000}),
    ]:
        meta = {**base, **change}
        yield Case(f"session-meta:{what}", with_meta(good, **meta), ("bad_metadata",))


def foreign_files(exclude_fingerprint: str) -> list[bytes]:
    """Valid memory files of other tiny models (every tiny preset, another seed, another
    config with the same shapes), at a few positions; none of ``exclude_fingerprint``."""
    from newllm.config import PRESETS, ModelConfig
    from newllm.model import TransformerLM

    files = []
    variants: list[tuple[str, int, dict[str, Any]]] = [
        (name, 0, {}) for name in sorted(PRESETS) if name.startswith("tiny-")]
    variants += [("tiny-infini", 7, {}), ("tiny-infini", 0, {"use_delta_rule": False})]
    for name, seed, overrides in variants:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TransformerLM(ModelConfig.from_name(name, **overrides)).eval()
        if model.fingerprint() == exclude_fingerprint:
            continue
        for position in (0, 37):
            state = model.init_state(1)
            if position:
                ids = torch.arange(position).remainder(model.config.vocab_size)[None]  # (1, T)
                with torch.no_grad():
                    state = model(ids)[1]
            files.append(save_memory(state, model))
    return files


# running ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one case: refused with ``code``, ``loaded`` (allowed or not), or
    ``crash`` (any exception that is not a MemoryFileError); ``refused-valid``: a valid file
    (``must_load``) was refused."""

    case: Case
    result: str  # "refused", "loaded-same", "loaded", "crash", "wrong-code", "refused-valid"
    detail: str

    @property
    def ok(self) -> bool:
        return self.result in ("refused", "loaded-same")


def _same_state(a: Any, b: Any) -> bool:
    fa, fb = a.flat_tensors(), b.flat_tensors()
    return a.position == b.position and list(fa) == list(fb) and all(
        torch.equal(fa[k], fb[k]) for k in fa)


def run_case(case: Case, model: Any, reference: Any, *, tokenizer_hash: str | None,
             max_bytes: int | None) -> Outcome:
    """Load ``case.data`` into ``model``; ``reference`` is the state of the original file."""
    try:
        state = load_memory(case.data, model, tokenizer_hash=tokenizer_hash, max_bytes=max_bytes)
    except MemoryFileError as e:
        if case.must_load and e.code != "too_large":  # a size limit may refuse a valid file
            return Outcome(case, "refused-valid", f"{e.code}: {e}")
        if case.codes and e.code not in case.codes:
            return Outcome(case, "wrong-code", f"{e.code} (expected {case.codes}): {e}")
        return Outcome(case, "refused", e.code)
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return Outcome(case, "crash", f"{type(e).__name__}: {e}"[:300])
    if case.may_load and _same_state(state, reference):
        return Outcome(case, "loaded-same", "")
    return Outcome(case, "loaded", f"position {state.position}")


def fuzz_load(cases: Sequence[Case], model: Any, reference: Any, *,
              tokenizer_hash: str | None = None,
              max_bytes: int | None = None) -> tuple[list[Outcome], int, int]:
    """Every case through `load_memory`; (outcomes, tracemalloc peak bytes, max-RSS growth
    bytes). The peak counts Python allocations (bytes, lists, dicts), the RSS growth also
    tensors: a header that claims terabytes must move neither."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        outcomes = [run_case(c, model, reference, tokenizer_hash=tokenizer_hash,
                             max_bytes=max_bytes) for c in cases]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    return outcomes, peak, rss


def sample(cases: Sequence[Case], k: int, seed: int = 0) -> list[Case]:
    """``k`` cases spread over the categories (round robin over a seeded shuffle)."""
    rng = random.Random(seed)
    by_category: dict[str, list[Case]] = {}
    for c in cases:
        by_category.setdefault(c.category, []).append(c)
    for group in by_category.values():
        rng.shuffle(group)
    out: list[Case] = []
    while len(out) < min(k, len(cases)):
        for group in by_category.values():
            if group and len(out) < k:
                out.append(group.pop())
    return out


def fuzz_server(url: str, key: str | None, cases: Sequence[Case], victim: str, *,
                max_bytes: int | None = None) -> list[str]:
    """PUT every case to ``url``: to the ``victim`` session and to a fresh id. Returns the
    problems found (empty: every upload got a 4xx JSON error naming the case's problem, and
    nothing changed). ``max_bytes``: the server's --max-memory-bytes; a bigger file must get
    413 whatever else is wrong with it."""
    import httpx

    problems: list[str] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=60, trust_env=False) as http:
        before = http.get(f"/v1/sessions/{victim}/memory").content
        for i, case in enumerate(cases):
            for sid in (victim, f"fuzz-fresh-{i}"):
                try:
                    r = http.put(f"/v1/sessions/{sid}/memory", content=case.data)
                except httpx.TransportError as e:
                    problems.append(f"{case.name} -> {sid}: {type(e).__name__}: {e}")
                    continue
                try:
                    error = r.json()["error"]
                    assert 400 <= r.status_code < 500 and error["message"] and error["code"]
                except (ValueError, KeyError, TypeError, AssertionError):
                    problems.append(f"{case.name} -> {sid}: {r.status_code} {r.text[:200]}")
                    continue
                codes = case.codes
                if max_bytes is not None and len(case.data) > max_bytes:
                    codes = ("request_too_large", "too_large")
                if codes and error["code"] not in codes:
                    problems.append(f"{case.name}: code {error['code']}, expected {case.codes}")
        if http.get(f"/v1/sessions/{victim}/memory").content != before:
            problems.append(f"session {victim!r} changed")
        ids = {row["id"] for row in http.get("/v1/sessions").json()["data"]}
        problems += [f"{sid} was created" for sid in ids if sid.startswith("fuzz-fresh-")]
        if http.get("/health").status_code != 200:
            problems.append("the server is not healthy after the run")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips", type=int, default=500, help="bit flips per region")
    parser.add_argument("--checkpoint", default="tiny-infini")
    parser.add_argument("--url", help="fuzz PUT /v1/sessions/{id}/memory of this server")
    parser.add_argument("--key", help="the server's API key")
    parser.add_argument("--cases", type=int, default=300, help="cases sent to the server")
    parser.add_argument("--max-memory-bytes", type=int, help="the server's limit, if not 512 MiB",
                        default=512 << 20)
    args = parser.parse_args(argv)

    from newllm.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    with torch.no_grad():
        reference = model(torch.arange(1, 38)[None])[1]  # (1, 37)
    good = save_memory(reference, model, tokenizer_hash=tokenizer.sha256)
    cases = list(hostile_files(good, others=foreign_files(model.fingerprint()), seed=args.seed,
                               flips=args.flips))
    outcomes, peak, rss = fuzz_load(cases, model, reference, tokenizer_hash=tokenizer.sha256)
    tally = Counter((o.case.category, o.result) for o in outcomes)
    for (category, result), count in sorted(tally.items()):
        print(f"{category:16s} {result:12s} {count}")
    bad = [o for o in outcomes if not o.ok]
    for o in bad:
        print(f"FAIL {o.case.name}: {o.result} {o.detail}")
    print(f"{len(cases)} cases, {len(bad)} failures, tracemalloc peak {peak / 2**20:.1f} MiB, "
          f"max RSS growth {rss / 2**20:.1f} MiB")
    if args.url:
        victim = "fuzz-victim"
        headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
        import httpx

        r = httpx.post(args.url + "/v1/chat/completions", headers=headers, trust_env=False,
                       timeout=60, json={"model": model.config.name, "max_tokens": 2,
                                         "messages": [{"role": "user", "content": "hi"}],
                                         "metadata": {"session_id": victim}})
        r.raise_for_status()
        exported = httpx.get(f"{args.url}/v1/sessions/{victim}/memory", headers=headers,
                             trust_env=False).content
        server_cases = list(hostile_files(exported, seed=args.seed, flips=args.flips))
        server_cases = [c for c in server_cases if not c.may_load]
        server_cases += list(hostile_session_metadata(exported))
        chosen = sample(server_cases, args.cases, args.seed)
        problems = fuzz_server(args.url, args.key, chosen, victim,
                               max_bytes=args.max_memory_bytes)
        for p in problems:
            print(f"SERVER FAIL {p}")
        print(f"server: {len(chosen)} cases x 2 session ids, {len(problems)} problems")
        bad += problems  # type: ignore[arg-type]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
