"""Half weights (`newllm.half_weights`): linear weights in float16, products in float32.

The plain reference is float32 arithmetic on the same (float16-rounded) weights: the kernel
against ``x @ w.float().t()`` over awkward shapes and thread counts; a model under
`use_half_weights` against a float32 copy of it whose weights were rounded the same way (prefill,
decode steps, states, every variant); the compiled slot step against the eager half model; the
fingerprints and memory-file moves between the two modes; `newllm generate --half-weights` end
to end; and the refusals (not float32, not on the CPU, no kernel here).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    VARIANTS,
    assert_states_close,
    decode_rows_like_alone,
    make_tiny_model,
    need_half_kernel,
    read_state,
    variant_model,
)

from newllm import half_weights
from newllm import memory_file as mf
from newllm.checkpoint import save_pretrained
from newllm.cli import main
from newllm.half_weights import HalfWeightLinear, HalfWeightsUnavailable, matvec_f16_reference
from newllm.slots import Slots


@pytest.fixture(autouse=True)
def _kernel() -> None:
    need_half_kernel()


def rounded_copy(model: Any) -> Any:
    """A float32 copy of ``model`` whose linear weights are rounded to float16 and back: the
    model that half weights compute, in plain float32."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref._matvec_linears():
            m.weight.copy_(m.weight.half().float())
    return ref


@pytest.mark.parametrize("n,i,o", [(1, 256, 768), (1, 1024, 256), (2, 37, 5), (3, 7, 4),
                                   (5, 1000, 37), (16, 64, 129), (1, 1, 1), (0, 8, 3)])
def test_kernel_matches_the_float32_reference(n: int, i: int, o: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + i + o)
    x = torch.randn(n, i, generator=g)
    w = torch.randn(o, i, generator=g).half()
    got = half_weights.matvec_f16(x, w)
    assert got.shape == (n, o) and got.dtype == torch.float32
    exact = (x.double() @ w.double().t()).float()
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * (1 + i ** 0.5))
    torch.testing.assert_close(got, matvec_f16_reference(x, w), rtol=1e-5,
                               atol=1e-5 * (1 + i ** 0.5))


def test_kernel_gives_the_same_values_on_any_thread_count() -> None:
    x, w = torch.randn(3, 300), torch.randn(517, 300).half()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = half_weights.matvec_f16(x, w)
        torch.set_num_threads(2)
        two = half_weights.matvec_f16(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is one row's dot product, however split


def test_kernel_refuses_bad_input_by_name() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="float32 and w float16"):
        half_weights.matvec_f16(x, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="x has 8 columns, w has 9"):
        half_weights.matvec_f16(x, torch.randn(3, 9).half())
    with pytest.raises(RuntimeError, match="must be 2-D"):
        half_weights.matvec_f16(x.view(2, 2, 4), torch.randn(3, 4).half())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_half_model_computes_the_rounded_float32_model(variant: str) -> None:
    model = variant_model(variant)
    ref = rounded_copy(model)
    half = copy.deepcopy(model).use_half_weights()
    assert half.half_weights and half.weights_dtype == torch.float16
    assert half.dtype == torch.float32 and not model.half_weights
    kinds = {type(m) for m in half._matvec_linears()}
    assert kinds == {HalfWeightLinear}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 500, (2, 21), generator=g)
    with torch.no_grad():
        want, want_state = ref(ids)  # prefill: many rows, the GEMM on converted weights
        got, state = half(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_states_close(state, want_state)
        for t in range(12):  # decode steps: 2 rows, the kernel
            tok = torch.randint(1, 500, (2, 1), generator=g)
            want, want_state = ref(tok, want_state)
            got, state = half(tok, state)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {t}")
        assert_states_close(state, want_state)


@pytest.mark.parametrize("preset", ["tiny-infini", "tiny-context-pythia"])
def test_compiled_slot_step_with_half_weights_gives_the_eager_logits(
        preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEWLLM_COMPILE", raising=False)
    half = make_tiny_model(preset, init_std=0.1).use_half_weights()
    slots = Slots(half, 2, compile=True)
    ref = {"a": read_state(half, 5, 1)}
    handle = {"a": slots.add(ref["a"])}
    # segment boundaries (16) included; "b" joins at step 8, "a" leaves at step 20
    decode_rows_like_alone(half, slots, handle, ref, read_state(half, 30, 2), join="b",
                           join_at=8, leave_at=20, steps=24)
    assert slots.compiled, "fell back to eager: nothing compared"
    assert_states_close(slots.remove(handle["b"]), ref["b"])


def test_checkpoint_identity_and_memory_moves_between_the_modes() -> None:
    model = make_tiny_model("tiny-infini", init_std=0.1)
    model.remember_checkpoint()
    half = copy.deepcopy(model).use_half_weights()
    assert half.checkpoint_fingerprint() == model.checkpoint_fingerprint()
    assert half.fingerprint() != model.fingerprint()
    state = read_state(half, 23, 1)
    data = mf.save_memory(state, half)
    meta = mf.read_memory_metadata(data)
    assert meta["weights_dtype"] == "float16" and meta["dtype"] == "float32"
    assert "weights_dtype" not in mf.read_memory_metadata(mf.save_memory(state, model))
    # into the full-precision model: a move across precision, said as such
    report = mf.load_memory_report(data, model)
    assert report.conversion is not None
    assert report.conversion.as_dict() == {
        "from": {"dtype": "float32", "device": "cpu", "weights_dtype": "float16"},
        "to": {"dtype": "float32", "device": "cpu"}}
    assert "float32 with float16 weights" in str(report.conversion)
    assert_states_close(report.state, state)
    with pytest.raises(mf.ConversionRefusedError, match="float16 weights"):
        mf.load_memory(data, model, strict=True)
    # and back, and into the mode that wrote it (no conversion)
    back = mf.load_memory_report(mf.save_memory(state, model), half)
    assert back.conversion is not None and back.conversion.to_weights == "float16"
    assert mf.load_memory_report(data, half).conversion is None
    # another checkpoint is still refused
    other = make_tiny_model("tiny-infini", seed=9, init_std=0.1).use_half_weights()
    with pytest.raises(mf.ModelMismatchError):
        mf.load_memory(data, other)


def test_use_half_weights_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="need a float32 model.*bfloat16"):
        make_tiny_model("tiny-infini").to(torch.bfloat16).use_half_weights()


def test_kernel_unavailable_is_reported_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(half_weights, "_loaded", {})
    monkeypatch.setattr(half_weights.platform, "machine", lambda: "aarch64")
    problem = half_weights.kernel_problem()
    assert problem is not None and "x86-64" in problem and "aarch64" in problem
    model = make_tiny_model("tiny-infini")
    with pytest.raises(HalfWeightsUnavailable, match="x86-64"):
        model.use_half_weights()
    assert not model.half_weights  # nothing converted


def test_loading_again_in_one_process_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    path = half_weights.load_kernel()
    monkeypatch.setattr(half_weights, "_loaded", {})  # as if never loaded: load it again
    assert half_weights.load_kernel() == path
    x, w = torch.randn(2, 16), torch.randn(3, 16).half()
    torch.testing.assert_close(half_weights.matvec_f16(x, w), matvec_f16_reference(x, w))


def test_a_failed_build_names_the_compiler_error(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(half_weights, "_loaded", {})
    monkeypatch.setenv(half_weights.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(half_weights, "SOURCE", tmp_path / "broken.cpp")
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(HalfWeightsUnavailable, match="building the half-weight kernel failed"):
        half_weights.load_kernel()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.cpp"]  # no half-written library


def test_generate_with_half_weights_end_to_end(tmp_path: Path, byte_tokenizer: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # a checkpoint stored in float16, like the bundled one: half weights are exactly its weights
    folder = save_pretrained(make_tiny_model("tiny-infini", init_std=0.1), tmp_path / "ck",
                             byte_tokenizer, dtype=torch.float16)
    args = ["generate", "--checkpoint", str(folder), "--temperature", "0", "--prompt",
            "Hello there", "--max-tokens", "16"]
    assert main(args) == 0
    full = capsys.readouterr().out
    assert main([*args, "--half-weights", "--memory-out", str(tmp_path / "m.safetensors")]) == 0
    assert capsys.readouterr().out == full and full.strip()
    meta = mf.read_memory_metadata(tmp_path / "m.safetensors")
    assert meta["weights_dtype"] == "float16"
    assert main([*args, "--half-weights", "--dtype", "bfloat16"]) == 2
    assert "--half-weights computes in float32" in capsys.readouterr().err
    # left to the default: on, since these float16 weights round nothing; said under -v
    modes = {}
    for extra in ([], ["--no-half-weights"], ["--dtype", "float32"]):
        out = tmp_path / f"m{len(modes)}.safetensors"
        assert main([*args, *extra, "-v", "--memory-out", str(out)]) == 0
        said = capsys.readouterr()
        meta = mf.read_memory_metadata(out)
        modes[" ".join(extra)] = (meta["dtype"], meta.get("weights_dtype", meta["dtype"]))
        if not extra:
            assert said.out == full and "kept in float16" in said.err
    assert modes == {"": ("float32", "float16"),  # the default: half weights
                     "--no-half-weights": ("float16", "float16"),  # as stored, as before
                     "--dtype float32": ("float32", "float32")}  # a dtype asked for, as asked


def test_the_default_takes_half_weights_only_where_they_round_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rounded = rounded_copy(make_tiny_model("tiny-infini", init_std=0.1))
    model, said = half_weights.auto(copy.deepcopy(rounded))
    assert model.half_weights and model.dtype == torch.float32 and "nothing is rounded" in said
    assert half_weights.auto(model) == (model, "linear weights kept in float16 already")
    stored = copy.deepcopy(rounded).half()  # a float16 checkpoint loaded as stored
    model, _ = half_weights.auto(copy.deepcopy(stored))
    assert model.half_weights and model.dtype == torch.float32
    x = torch.randint(0, 256, (1, 20))  # as if loaded in float32: the same model, bit for bit
    assert torch.equal(model(x)[0], half_weights.auto(stored.float())[0](x)[0])
    trained = make_tiny_model("tiny-infini", init_std=0.1)  # float32 values: would be rounded
    model, said = half_weights.auto(trained)
    assert not model.half_weights and "not float16 values" in said
    assert model.dtype == torch.float32
    assert half_weights.auto(copy.deepcopy(rounded).bfloat16())[1].startswith(
        "weights as loaded, not kept in float16: the model computes in bfloat16")
    monkeypatch.setattr(half_weights, "_loaded", {"error": "no C++ compiler found"})
    model, said = half_weights.auto(copy.deepcopy(rounded))  # no kernel here: as loaded
    assert not model.half_weights and "no C++ compiler found" in said
