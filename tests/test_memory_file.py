"""Memory files: exact round trips for every layer kind, sessions that continue identically after
moving to a fresh model object, hostile files each refused with their own error class while
the model and the live state stay untouched, and format version 2's metadata hash (edited
metadata refused, version 1 files without it still loaded)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import random
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from tiny import make

import newllm.memory_file as mf
from newllm.memory_file import (
    ChecksumError,
    FormatVersionError,
    MemoryFileError,
    MetadataChecksumError,
    MetadataError,
    ModelMismatchError,
    NonFiniteError,
    NotSafetensorsError,
    TensorMismatchError,
    TokenizerMismatchError,
    TooLargeError,
    TruncatedError,
    ValueRangeError,
    load_memory,
    metadata_sha256,
    payload_sha256,
    read_memory_metadata,
    save_memory,
    serialize,
)
from newllm.model import TransformerLM
from newllm.session import Session
from newllm.state import ModelState

TINY = ["tiny-pythia", "tiny-infini", "tiny-multi-memory", "tiny-hierarchical",
        "tiny-context-pythia", "tiny-context-kv"]
POSITIONS = [0, 5, 16, 37]  # segment_len 16, chunk_size 8: empty, open, boundary, past two




def state_after(model: TransformerLM, n: int, batch: int = 1, seed: int = 1) -> ModelState:
    if n == 0:
        return model.init_state(batch)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=g)
    with torch.no_grad():
        return model(ids)[1]


def assert_states_equal(a: ModelState, b: ModelState) -> None:
    assert a.position == b.position
    assert [type(x) for x in a.layers] == [type(x) for x in b.layers]
    fa, fb = a.flat_tensors(), b.flat_tensors()
    assert list(fa) == list(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        assert fa[name].shape == fb[name].shape, name
        assert torch.equal(fa[name].view(torch.uint8), fb[name].contiguous().view(torch.uint8)), \
            name  # bitwise


# round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("position", POSITIONS, ids=lambda p: f"P{p}")
@pytest.mark.parametrize("name", TINY)
def test_round_trip_is_bitwise_exact(name: str, position: int) -> None:
    model = make(name)
    state = state_after(model, position)
    data = save_memory(state, model)
    loaded = load_memory(data, model)
    assert_states_equal(state, loaded)
    assert (loaded.context is None) == (model.context_block is None)
    # only the views are saved: the payload is exactly the state's bytes
    header_len = struct.unpack("<Q", data[:8])[0]
    assert len(data) - 8 - header_len == state.nbytes()
    meta = read_memory_metadata(data)
    assert meta["position"] == str(position)
    assert meta["batch_size"] == "1"
    assert json.loads(meta["layer_kinds"]) == list(model.config.layers)
    assert meta["model_fingerprint"] == model.fingerprint()
    assert meta["payload_sha256"] == payload_sha256(state) == payload_sha256(loaded)
    # the loaded state continues exactly like the original
    ids = torch.randint(0, 500, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, sa = model(ids, state)
        b, sb = model(ids, loaded)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert sb.position == sa.position == position + 13


def test_round_trip_batch_of_two_and_views_of_bigger_buffers() -> None:
    model = make("tiny-pythia")
    state = state_after(model, 37, batch=2)
    k = state.flat_tensors()["layers.1.k"]
    assert k.untyped_storage().nbytes() > k.numel() * k.element_size()  # a view of a buffer
    data = save_memory(state, model)
    loaded = load_memory(data, model)
    assert_states_equal(state, loaded)
    assert loaded.batch_size == 2
    assert loaded.resident_bytes() == loaded.nbytes()  # nothing spare came along


def greedy(model: TransformerLM, state: ModelState, first: int,
           n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Feed ``first``, then always the argmax; the tokens and the logits on the way."""
    tokens, logits_seen, tok = [], [], first
    with torch.no_grad():
        for _ in range(n):
            logits, state = model(torch.tensor([[tok]]), state, last_only=True)
            logits_seen.append(logits[0, -1])
            tok = int(logits[0, -1].argmax())
            tokens.append(tok)
    return tokens, logits_seen


@pytest.mark.parametrize("name", TINY)
def test_session_moved_to_a_fresh_model_continues_identically(name: str, tmp_path: Path) -> None:
    model = make(name, init_std=0.1)  # larger weights: clear argmax margins
    prompt = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    session = Session(model)
    logits = session.feed(prompt)
    first = int(logits[-1].argmax())
    path = tmp_path / "memory.safetensors"
    session.save(path)
    expected, expected_logits = greedy(model, session.get_memory_state(), first, 24)

    # a fresh object with the same weights: rebuilt from the seed, and copied by state_dict
    rebuilt = make(name, init_std=0.1)
    copied = TransformerLM(model.config).eval()
    copied.load_state_dict(model.state_dict())
    for fresh in (rebuilt, copied):
        assert fresh is not model and fresh.fingerprint() == model.fingerprint()
        moved = Session.load(path, fresh)
        assert moved.tokens_seen == 30
        tokens, got_logits = greedy(fresh, moved.get_memory_state(), first, 24)
        assert tokens == expected  # 30 + 24 tokens: crosses segment and chunk boundaries
        torch.testing.assert_close(torch.stack(got_logits), torch.stack(expected_logits),
                                   atol=1e-5, rtol=1e-5)


def test_save_writes_the_returned_bytes_atomically(tmp_path: Path) -> None:
    model = make("tiny-context-kv")
    state = state_after(model, 21)
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"old")
    data = save_memory(state, model, path, tokenizer_hash="ab" * 32, metadata={"note": "hi"})
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temp left
    meta = read_memory_metadata(path)
    assert meta["note"] == "hi" and meta["tokenizer_hash"] == "ab" * 32
    assert meta["format"] == mf.FORMAT_NAME and meta["format_version"] == mf.FORMAT_VERSION
    assert meta["dtype"] == "float32" and meta["config_name"] == "tiny-context-kv"
    assert_states_equal(state, load_memory(str(path), model))


def test_files_are_canonical_and_standard_safetensors() -> None:
    """The same state gives the same bytes (re-export after import is identical), and
    safetensors' own loader reads our files."""
    from safetensors.torch import load as st_load

    model = make("tiny-infini")
    state = state_after(model, 21)
    data = save_memory(state, model, metadata={"b": "2", "a": "1"})
    assert save_memory(state, model, metadata={"a": "1", "b": "2"}) == data
    again = save_memory(load_memory(data, model), model, metadata={"a": "1", "b": "2"})
    assert again == data
    loaded = st_load(data)
    for name, t in state.flat_tensors().items():
        assert torch.equal(loaded[name], t)


def test_save_refuses_bad_states_and_reserved_metadata() -> None:
    model = make("tiny-infini")
    state = state_after(model, 20)
    with pytest.raises(ValueError, match="reserved"):
        save_memory(state, model, metadata={"position": "3"})
    with pytest.raises(ValueError, match="reserved"):
        save_memory(state, model, metadata={"metadata_sha256": "0" * 64})
    with pytest.raises(TensorMismatchError):
        save_memory(state_after(make("tiny-pythia"), 20), model)
    layer0 = state.layers[0]
    poisoned = ModelState(state.position, (type(layer0)(**{
        **{f: getattr(layer0, f) for f in ("z", "open_k", "open_v")},
        "memory": torch.full_like(layer0.memory, float("nan"))}),) + state.layers[1:])
    with pytest.raises(NonFiniteError, match="layers.0.memory"):
        save_memory(poisoned, model)


def test_memory_file_code_has_no_pickle() -> None:
    for module in ("memory_file.py", "session.py"):
        source = (Path(mf.__file__).parent / module).read_text()
        for banned in ("import pickle", "torch.load(", "weights_only=False"):
            assert banned not in source


# hostile files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return make("tiny-infini")


@pytest.fixture(scope="module")
def good(model: TransformerLM) -> bytes:
    return save_memory(state_after(model, 37), model, tokenizer_hash="a" * 64)


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def resave(good: bytes, change, meta_change=None, rehash: bool = True) -> bytes:
    """Re-write a valid file with its tensors changed by ``change(dict)`` (hashes kept right)."""
    from safetensors.torch import load as st_load

    tensors = st_load(good)
    change(tensors)
    meta = split(good)[0]["__metadata__"]
    if rehash:
        meta["payload_sha256"] = payload_sha256(tensors)
    if meta_change:
        meta_change(meta)
    if rehash:
        meta["metadata_sha256"] = metadata_sha256(meta)
    return st_save(tensors, metadata=meta)


def with_meta(good: bytes, *, rehash: bool = True, **changes: str | None) -> bytes:
    """``good`` with metadata changed; ``rehash``: its metadata_sha256 recomputed (unless
    ``changes`` names it), so that only the change itself can be refused."""
    header, payload = split(good)
    meta = header["__metadata__"]
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    if rehash and "metadata_sha256" in meta and "metadata_sha256" not in changes:
        meta["metadata_sha256"] = metadata_sha256(meta)
    return join(header, payload)


def as_version_1(data: bytes) -> bytes:
    """``data`` as format version 1's save_memory wrote it: the same canonical layout, no
    metadata_sha256 (that writer did not know it), format_version "1"."""
    from safetensors.torch import load as st_load

    meta = dict(split(data)[0]["__metadata__"])
    del meta["metadata_sha256"]
    meta["format_version"] = "1"
    return serialize(st_load(data), meta)


class HashOnly:
    """Stands in for a tokenizer: a session only asks it for its hash."""

    def __init__(self, sha256: object) -> None:
        self.sha256 = sha256


def refused(data: bytes, error: type[MemoryFileError], model: TransformerLM,
            match: str | None = None, **kwargs: object) -> MemoryFileError:
    """``data`` is refused with exactly ``error``; the model and a live session are unchanged."""
    fingerprint = model.fingerprint()
    tokenizer = HashOnly(kwargs["tokenizer_hash"]) if "tokenizer_hash" in kwargs else None
    session = Session(model, tokenizer)
    session.feed(list(range(20)))
    before = session.get_memory_state()
    snapshot = {k: v.clone() for k, v in before.flat_tensors().items()}
    with pytest.raises(error, match=match) as info:
        session.restore(data, max_bytes=kwargs.get("max_bytes"),
                        strict=bool(kwargs.get("strict", False)))
    assert type(info.value) is error and info.value.code == error.code
    assert isinstance(info.value, ValueError) and str(info.value)
    assert session.get_memory_state() is before and session.tokens_seen == 20
    for k, v in before.flat_tensors().items():
        assert torch.equal(v, snapshot[k])
    assert model.fingerprint() == fingerprint
    with pytest.raises(error):
        load_memory(data, model, **kwargs)
    return info.value


def test_good_file_loads(model: TransformerLM, good: bytes) -> None:
    assert load_memory(good, model).position == 37
    assert load_memory(good, model, tokenizer_hash="a" * 64).position == 37


def test_random_bytes_and_empty(model: TransformerLM) -> None:
    rng = random.Random(0)
    for n in (9, 100, 4096):
        refused(rng.randbytes(n), NotSafetensorsError, model)
    refused(b"", NotSafetensorsError, model)
    refused(struct.pack("<Q", 40) + rng.randbytes(60), NotSafetensorsError, model)  # not JSON
    refused(struct.pack("<Q", 10) + b"{not json}", NotSafetensorsError, model)
    refused(join([1, 2], b""), NotSafetensorsError, model)  # type: ignore[arg-type]


def test_truncated_at_many_offsets(model: TransformerLM, good: bytes) -> None:
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    cuts = set(range(1, 10)) | {header_end // 2, header_end - 1, header_end, header_end + 1,
                                len(good) - 1} | set(range(header_end, len(good), 997))
    for cut in sorted(cuts):
        refused(good[:cut], TruncatedError, model, match="cut off|ends")


def test_header_length_pointing_past_the_end(model: TransformerLM, good: bytes) -> None:
    n = struct.unpack("<Q", good[:8])[0]
    refused(struct.pack("<Q", n + 50_000) + good[8:], TruncatedError, model)
    refused(struct.pack("<Q", 2**63) + good[8:], NotSafetensorsError, model)


def test_huge_shapes_allocate_nothing(model: TransformerLM, good: bytes) -> None:
    header, _ = split(good)
    meta = header["__metadata__"]
    huge = [10**6, 10**6, 10**6]
    consistent = {"__metadata__": meta,
                  "layers.1.k": {"dtype": "F32", "shape": huge, "data_offsets": [0, 4 * 10**18]}}
    tracemalloc.start()
    try:
        refused(join(consistent, b"\0" * 64), TruncatedError, model)
        refused(join(consistent, b"\0" * 64), TooLargeError, model, max_bytes=10**6)
        inconsistent = {"__metadata__": meta,
                        "layers.1.k": {"dtype": "F32", "shape": huge, "data_offsets": [0, 64]}}
        refused(join(inconsistent, b"\0" * 64), NotSafetensorsError, model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # a few MB at most, nowhere near the claimed exabytes


def test_overlapping_gapped_and_trailing_offsets(model: TransformerLM, good: bytes) -> None:
    header, payload = split(good)
    overlap = json.loads(json.dumps(header))
    overlap["layers.0.open_v"]["data_offsets"] = overlap["layers.0.open_k"]["data_offsets"]
    refused(join(overlap, payload), NotSafetensorsError, model, match="overlaps")
    gapped = json.loads(json.dumps(header))
    for name, info in gapped.items():
        if name != "__metadata__":
            info["data_offsets"] = [o + 8 for o in info["data_offsets"]]
    refused(join(gapped, b"\0" * 8 + payload), NotSafetensorsError, model, match="gap")
    refused(good + b"\0" * 8, NotSafetensorsError, model, match="after the last tensor")
    dup = json.dumps(header).encode()
    dup = dup[:-1] + b', "__metadata__": {}}'
    refused(struct.pack("<Q", len(dup)) + dup + payload, NotSafetensorsError, model,
            match="twice")


def test_unknown_and_wrong_dtypes(model: TransformerLM, good: bytes) -> None:
    header, payload = split(good)
    header["layers.0.z"]["dtype"] = "F99"
    refused(join(header, payload), NotSafetensorsError, model, match="unknown dtype")

    def to64(t: dict) -> None:
        t["layers.0.open_k"] = t["layers.0.open_k"].double()
    refused(resave(good, to64), TensorMismatchError, model, match="layers.0.open_k")

    def all_half(t: dict) -> None:
        for k in t:
            t[k] = t[k].half()
    refused(resave(good, all_half, lambda m: m.update(dtype="float16")), TensorMismatchError,
            model, match="float16")


def test_wrong_shapes_missing_and_extra_tensors(model: TransformerLM, good: bytes) -> None:
    def longer(t: dict) -> None:
        t["layers.0.open_k"] = torch.cat((t["layers.0.open_k"], t["layers.0.open_k"][:, :, :1]), 2)
    refused(resave(good, longer), TensorMismatchError, model, match="layers.0.open_k")
    # metadata says 36 tokens, tensors are those of 37
    refused(with_meta(good, position="36"), TensorMismatchError, model, match="36 tokens")

    def drop(t: dict) -> None:
        del t["layers.0.z"]
    refused(resave(good, drop), TensorMismatchError, model, match="layers.0.z")

    def add(t: dict) -> None:
        t["layers.0.bogus"] = torch.zeros(3)
    refused(resave(good, add), TensorMismatchError, model, match="layers.0.bogus")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(model: TransformerLM, good: bytes, value: float) -> None:
    def poison(t: dict) -> None:
        t["layers.1.v"][0, 2, 3, 3] = value
    err = refused(resave(good, poison), NonFiniteError, model, match="layers.1.v")
    assert "NaN or inf" in str(err)


def test_forged_values_are_refused(model: TransformerLM, good: bytes) -> None:
    """Finite but impossible values (a forger can copy fingerprint and hash) are refused."""
    def huge(t: dict) -> None:
        t["layers.0.memory"][0, 0, 0, 0, 0] = 3e38
    refused(resave(good, huge), ValueRangeError, model, match="layers.0.memory")

    def negative_z(t: dict) -> None:
        t["layers.0.z"][0, 0, 0, 1] = -1.0
    refused(resave(good, negative_z), ValueRangeError, model, match="layers.0.z")


def test_forged_counts_are_refused() -> None:
    multi = make("tiny-multi-memory")
    data = save_memory(state_after(multi, 37), multi)

    def too_many(t: dict) -> None:
        t["layers.0.count"][0, 0] = 1000.0
    refused(resave(data, too_many), ValueRangeError, multi, match="count")

    def fractional(t: dict) -> None:
        t["layers.0.count"][0, 0] = 0.5
    refused(resave(data, fractional), ValueRangeError, multi, match="whole")


def test_low_precision_models_keep_memory_in_float32() -> None:
    """bf16/fp16 models: memory tensors stay float32 (no saturating counts), files round-trip."""
    for dtype in (torch.bfloat16, torch.float16):
        m = make("tiny-multi-memory").to(dtype)
        state = state_after(m, 16 * 40 + 5)
        assert state.layers[0].memory.dtype == torch.float32
        assert state.layers[0].open_k.dtype == dtype
        assert float(state.layers[0].count.sum()) == 16 * 40
        loaded = load_memory(save_memory(state, m), m)
        assert_states_equal(loaded, state)


def test_another_models_memory(model: TransformerLM, good: bytes) -> None:
    other_weights = make("tiny-infini", seed=5)
    err = refused(save_memory(state_after(other_weights, 37), other_weights),
                  ModelMismatchError, model, match="same config with other weights")
    assert "load it into the checkpoint that wrote it" in str(err)
    other_config = make("tiny-pythia")
    refused(save_memory(state_after(other_config, 37), other_config), ModelMismatchError, model,
            match="tiny-pythia")
    delta = make("tiny-infini", use_delta_rule=False)  # same shapes, another config
    refused(save_memory(state_after(delta, 37), delta), ModelMismatchError, model,
            match="another config")


# moves across precision ----------------------------------------------------------------------
def copies() -> dict[torch.dtype, TransformerLM]:
    """One checkpoint (tiny-infini as loaded) served at three precisions."""
    from newllm.checkpoint import load_checkpoint

    return {dt: load_checkpoint("tiny-infini", dtype=dt)[0]
            for dt in (torch.float32, torch.bfloat16, torch.float16)}


@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.float32),
                                     (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.float32)])
def test_a_state_moves_to_the_same_checkpoint_at_another_precision(src: torch.dtype,
                                                                   dst: torch.dtype) -> None:
    models = copies()
    writer, reader = models[src], models[dst]
    assert writer.fingerprint() != reader.fingerprint()
    assert writer.checkpoint_fingerprint() == reader.checkpoint_fingerprint()
    state = state_after(writer, 37)
    data = save_memory(state, writer)
    meta = read_memory_metadata(data)
    assert meta["dtype"] == str(src).removeprefix("torch.") and meta["device_type"] == "cpu"
    assert meta["torch_version"] == torch.__version__
    report = mf.load_memory_report(data, reader)
    assert report.conversion is not None
    assert report.conversion.as_dict() == {
        "from": {"dtype": str(src).removeprefix("torch."), "device": "cpu"},
        "to": {"dtype": str(dst).removeprefix("torch."), "device": "cpu"}}
    assert "converted from" in str(report.conversion)
    got, want = report.state.flat_tensors(), reader.state_dtypes()
    for name, t in got.items():  # what the reader keeps: memory float32, the rest its dtype
        assert t.dtype == want[name], name
        torch.testing.assert_close(t, state.flat_tensors()[name].to(t.dtype), rtol=0, atol=0)
    with torch.no_grad():  # and it continues
        logits, _ = reader(torch.tensor([[3]]), report.state)
    assert bool(torch.isfinite(logits).all())
    assert mf.load_memory_report(save_memory(state_after(reader, 5), reader),
                                 reader).conversion is None
    err = refused(data, mf.ConversionRefusedError, reader, strict=True)
    assert str(src).removeprefix("torch.") in str(err) and str(dst).removeprefix(
        "torch.") in str(err)


def test_a_conversion_that_overflows_is_refused() -> None:
    models = copies()
    state = state_after(models[torch.float32], 5)
    big = state.layers[0].open_k * 1e6  # finite in float32, beyond float16
    state = ModelState(5, (dataclasses.replace(state.layers[0], open_k=big),
                           *state.layers[1:]), state.context)
    data = save_memory(state, models[torch.float32])
    err = refused(data, NonFiniteError, models[torch.float16], match="cannot represent")
    assert "float16" in str(err)


def test_files_of_the_previous_release_still_load() -> None:
    """No checkpoint keys (written before them): loads into the model that wrote it; at another
    precision it is refused, the message naming precision as a possible cause."""
    models = copies()
    data = save_memory(state_after(models[torch.float32], 20), models[torch.float32])
    old = with_meta(data, checkpoint_fingerprint=None, config_fingerprint=None,
                    device_type=None, torch_version=None)
    assert "checkpoint_fingerprint" not in read_memory_metadata(old)
    assert load_memory(old, models[torch.float32]).position == 20
    refused(old, ModelMismatchError, models[torch.bfloat16], match="another precision")


def test_format_and_version(model: TransformerLM, good: bytes) -> None:
    for version in ("3", "0", "2.0", "", "v2"):
        err = refused(with_meta(good, format_version=version), FormatVersionError, model,
                      match="version")
        assert "reads versions '1' and '2'" in str(err)
        with pytest.raises(FormatVersionError):
            read_memory_metadata(with_meta(good, format_version=version))
    refused(with_meta(good, format="something-else"), FormatVersionError, model)
    header, payload = split(good)
    del header["__metadata__"]
    refused(join(header, payload), FormatVersionError, model, match="not a newllm memory")


def test_tokenizer_hash(model: TransformerLM, good: bytes) -> None:
    refused(good, TokenizerMismatchError, model, tokenizer_hash="b" * 64)
    # either side not knowing its tokenizer: nothing to compare
    assert load_memory(with_meta(good, tokenizer_hash=None), model,
                       tokenizer_hash="b" * 64).position == 37


@pytest.mark.parametrize("key,value", [
    ("position", "-1"), ("position", "3.5"), ("position", "1e3"), ("position", " 37"),
    ("position", "3_7"), ("position", ""), ("position", "9" * 40), ("position", "0x25"),
    ("position", str(mf.MAX_POSITION + 1)), ("batch_size", "0"), ("batch_size", "two"),
    ("layer_kinds", "infini"), ("dtype", "float99"), ("model_fingerprint", "abc"),
    ("payload_sha256", None), ("position", None),
])
def test_bad_metadata(model: TransformerLM, good: bytes, key: str, value: str | None) -> None:
    refused(with_meta(good, **{key: value}), MetadataError, model)


def test_payload_hash_mismatch(model: TransformerLM, good: bytes) -> None:
    header, payload = split(good)
    begin = header["layers.1.k"]["data_offsets"][0]
    flipped = bytearray(payload)
    flipped[begin] ^= 1  # lowest mantissa bit of a float32: still finite, slightly different
    refused(join(header, bytes(flipped)), ChecksumError, model, match="corrupted")
    refused(with_meta(good, payload_sha256="0" * 64), ChecksumError, model)


def test_size_limit(model: TransformerLM, good: bytes, tmp_path: Path) -> None:
    refused(good, TooLargeError, model, max_bytes=len(good) - 1)
    path = tmp_path / "m.safetensors"
    path.write_bytes(good)
    with pytest.raises(TooLargeError):
        load_memory(path, model, max_bytes=100)
    assert load_memory(path, model, max_bytes=len(good)).position == 37


# format version 2: the metadata hash ---------------------------------------------------------
def test_version_2_round_trip_covers_every_metadata_entry(model: TransformerLM) -> None:
    state = state_after(model, 21)
    notes = {"session.kind": "chat", "note": "caf\u00e9 \u2713 \U0001f600", "a\"b": "x\\y\n"}
    data = save_memory(state, model, tokenizer_hash="c" * 64, metadata=notes)
    meta = read_memory_metadata(data)
    assert meta["format_version"] == mf.FORMAT_VERSION == "2"
    assert all(meta[k] == v for k, v in notes.items())
    # the documented encoding, computed here independently of the module
    others = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    assert set(others) | {"metadata_sha256"} == set(meta)
    canonical = json.dumps(dict(sorted(others.items())), ensure_ascii=True,
                           separators=(",", ":")).encode("ascii")
    assert meta["metadata_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert meta["metadata_sha256"] == metadata_sha256(meta) == metadata_sha256(others)
    assert_states_equal(state, load_memory(data, model, tokenizer_hash="c" * 64))
    # canonical: the same state and metadata give the same bytes, and re-saving a loaded file too
    assert save_memory(load_memory(data, model), model, tokenizer_hash="c" * 64,
                       metadata=notes) == data


def edits_behind_the_hash(good: bytes) -> dict[str, bytes]:
    """Files whose only fault is metadata changed without updating metadata_sha256."""
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    assert good.count(b'"note":"hi"') == 1
    flipped = good.replace(b'"note":"hi"', b'"note":"hj"')  # one byte, the JSON still parses
    assert len(flipped) == len(good) and flipped[header_end:] == good[header_end:]
    return {
        "byte flip in a value": flipped,
        "created_by": with_meta(good, rehash=False, created_by="newllm 0.0.0"),
        "config_name removed": with_meta(good, rehash=False, config_name=None),
        "tokenizer_hash removed": with_meta(good, rehash=False, tokenizer_hash=None),
        "entry added": with_meta(good, rehash=False, **{"session.turns": "3"}),
        "relabelled as version 1": with_meta(good, rehash=False, format_version="1"),
        "another well-formed hash": with_meta(good, metadata_sha256="0" * 64),
    }


def test_edited_metadata_is_refused_by_load_and_read(model: TransformerLM) -> None:
    good = save_memory(state_after(model, 37), model, tokenizer_hash="a" * 64,
                       metadata={"note": "hi"})
    for what, data in edits_behind_the_hash(good).items():
        err = refused(data, MetadataChecksumError, model, match="metadata_sha256",
                      tokenizer_hash="a" * 64)
        assert err.code == "metadata_checksum" and isinstance(err, ChecksumError), what
        with pytest.raises(MetadataChecksumError):
            read_memory_metadata(data)
    # the same edits with the hash recomputed load: the hash is the only thing refusing them
    for change in ({"created_by": "newllm 0.0.0"}, {"config_name": None},
                   {"session.turns": "3"}, {"note": "hj"}):
        data = with_meta(good, **change)
        assert load_memory(data, model).position == 37
        meta = read_memory_metadata(data)
        assert all(meta.get(k) == v for k, v in change.items()), change


def test_specific_problems_keep_their_codes_when_the_metadata_hash_is_stale(
        model: TransformerLM, good: bytes) -> None:
    """The metadata hash is checked last: a file with a specific fault gets that fault's error,
    even if its metadata was edited without updating the hash."""
    fp = read_memory_metadata(good)["model_fingerprint"]
    for changes, error in [
        ({"format_version": "3"}, FormatVersionError),
        ({"position": "x"}, MetadataError),
        ({"model_fingerprint": fp[::-1]}, ModelMismatchError),
        ({"position": "36"}, TensorMismatchError),
        ({"dtype": "float16"}, TensorMismatchError),
        ({"payload_sha256": "0" * 64}, ChecksumError),  # the tensors' hash, not the metadata's
    ]:
        refused(with_meta(good, rehash=False, **changes), error, model)
    refused(with_meta(good, rehash=False, created_by="x"), TokenizerMismatchError, model,
            tokenizer_hash="b" * 64)

    def poison(t: dict) -> None:
        t["layers.1.v"][0, 0, 0, 0] = float("nan")
    refused(with_meta(resave(good, poison), rehash=False, created_by="x"), NonFiniteError, model)


@pytest.mark.parametrize("value", [None, "", "0" * 63, "0" * 65, "g" * 64, "A" * 64,
                                   " " + "0" * 63])
def test_missing_or_malformed_metadata_hash(model: TransformerLM, good: bytes,
                                            value: str | None) -> None:
    data = with_meta(good, metadata_sha256=value)
    refused(data, MetadataError, model, match="metadata_sha256")
    with pytest.raises(MetadataError, match="metadata_sha256"):
        read_memory_metadata(data)


def test_version_1_files_still_load(model: TransformerLM, good: bytes, tmp_path: Path) -> None:
    v1 = as_version_1(good)
    assert len(v1) < len(good) and b"metadata_sha256" not in v1
    path = tmp_path / "old.safetensors"
    path.write_bytes(v1)
    meta = read_memory_metadata(path)
    assert meta["format_version"] == "1" and "metadata_sha256" not in meta
    state = load_memory(path, model, tokenizer_hash="a" * 64)
    assert_states_equal(state, load_memory(good, model))
    moved = Session.load(path, model, HashOnly("a" * 64))
    assert moved.tokens_seen == 37
    # saved again, it is a version 2 file of the same tensors
    again = read_memory_metadata(save_memory(state, model))
    assert again["format_version"] == "2" and again["payload_sha256"] == meta["payload_sha256"]
    # version 1 keeps its checks, but has no metadata hash: an informative edit goes unnoticed
    refused(with_meta(v1, position="36"), TensorMismatchError, model)
    refused(with_meta(v1, payload_sha256="0" * 64), ChecksumError, model)
    refused(with_meta(v1, payload_sha256=None), MetadataError, model)
    assert load_memory(with_meta(v1, created_by="edited"), model).position == 37


def load_fuzz_script():
    """``scripts/fuzz_memory.py`` as a module (the hardening tests load it the same way)."""
    if "fuzz_memory" in sys.modules:
        return sys.modules["fuzz_memory"]
    path = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_memory.py"
    spec = importlib.util.spec_from_file_location("fuzz_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_memory"] = module
    spec.loader.exec_module(module)
    return module


def test_fuzz_cases_for_the_metadata_hash(model: TransformerLM) -> None:
    fuzz = load_fuzz_script()
    reference = state_after(model, 37)
    good = save_memory(reference, model, tokenizer_hash="a" * 64,
                       metadata={"session.kind": "chat", "session.turns": "2"})
    cases = {c.name: c for c in fuzz.hostile_files(good, flips=0)}
    by_category = {}
    for c in cases.values():
        by_category.setdefault(c.category, []).append(c)
    hash_cases = by_category["meta-hash"]
    assert {"meta-hash:missing", "meta-hash:wrong", "meta-hash:not-hex",
            "meta-hash:stale-created_by='newllm 0.0.0'",
            "meta-hash:stale-session.turns='20'"} <= set(cases)
    assert [c.name for c in by_category["compat"]] == ["compat:v1"]
    for case in hash_cases + by_category["compat"] + by_category["meta"]:
        outcome = fuzz.run_case(case, model, reference, tokenizer_hash="a" * 64, max_bytes=None)
        assert outcome.ok, (case.name, outcome.result, outcome.detail)
        if case.name == "compat:v1":
            assert outcome.result == "loaded-same"
        else:
            assert outcome.result == "refused", case.name
    # the stale cases test the hash alone: recomputed, the same edits load
    stale = [c for c in hash_cases if c.name.startswith("meta-hash:stale-")]
    assert len(stale) >= 6 and all(c.codes == ("metadata_checksum",) for c in stale)
    for case in stale:
        fixed = fuzz.with_meta(case.data, metadata_sha256=metadata_sha256(fuzz.split(
            case.data)[0]["__metadata__"]))
        assert load_memory(fixed, model).position == 37, case.name
    # a valid version 1 file that a loader refuses is a failure of the run
    broken = fuzz.Case("compat:v1", with_meta(cases["compat:v1"].data, format_version="3"),
                       may_load=True, must_load=True)
    assert fuzz.run_case(broken, model, reference, tokenizer_hash=None,
                         max_bytes=None).result == "refused-valid"
