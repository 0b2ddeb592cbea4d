"""Half weights: linear weights stored in float16, products computed in float32 (CPU decoding).

A decode step reads every weight matrix once for one row (or a few), so on a CPU its time is the
weights' bytes over memory bandwidth: the bundled model's 20 MiB of float32 matrices take about
1.2 ms a step on our 2-core test machine, before any other work. `TransformerLM.use_half_weights`
keeps those matrices in float16, half the bytes, and computes in float32:

- products of up to `KERNEL_ROWS` rows (decode steps, small batches) run in ``newllm::matvec_f16``,
  a small AVX2 + F16C kernel (``csrc/matvec_f16.cpp``) that converts the weights in registers
  and accumulates in float32; it is compiled on first use with the C++ compiler torch.compile
  uses, against this torch, and cached (`kernel_dir`);
- products of more rows (prefill) convert the weight to float32 and run the BLAS GEMM, whose
  arithmetic is what counts there.

For a checkpoint stored in float16 (the bundled one, pythia's) the weights are exactly the
checkpoint's, so the model computed is the float32 one up to summation order (as with the
weight layout, `TransformerLM.use_input_major_weights`): outputs agree to float rounding, not
bit for bit, and a session moved between servers continues token for token when both run the same
mode. Memory files record the weights' dtypes in the model fingerprint, so a file written in
one mode loads in the other as a move across precision (`newllm.memory_file`). The plain
reference is `matvec_f16_reference`; the tests hold the kernel, the layers and the compiled step
to it. Inference only: the converted weights do not train.

`auto` is the default of ``newllm serve`` and ``newllm generate``: half weights exactly where they
round nothing (`lossless`: a checkpoint stored in float16) and the kernel runs; the library's
`newllm.load` stays float32 unless asked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("newllm")

KERNEL_ROWS = 16  # up to this many rows the kernel beats converting the weight for the GEMM
SOURCE = Path(__file__).with_name("csrc") / "matvec_f16.cpp"
KERNEL_DIR_ENV = "NEWLLM_KERNEL_DIR"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", "-std=c++17", "-w"]
_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "path" once loaded, or "error": why it cannot be
_fake_registered = False  # torch.compile's shape function: registered once per process


class HalfWeightsUnavailable(RuntimeError):
    """The half-weight kernel cannot run here (CPU features, no C++ compiler, build failed)."""


def matvec_f16_reference(x: Tensor, w: Tensor) -> Tensor:
    """What ``newllm::matvec_f16`` computes: x (N, I) float32 @ w (O, I) float16, in float32."""
    return x @ w.float().t()


def dtype_problem(dtype: str | None) -> str | None:
    """Why half weights cannot run with a requested model dtype (None: they can)."""
    if dtype in (None, "float32"):
        return None
    return f"--half-weights computes in float32; it cannot be combined with --dtype {dtype}"


def kernel_dir() -> Path:
    """Where built kernels are cached: ``$NEWLLM_KERNEL_DIR``, else ``~/.cache/newllm/kernels``
    (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get(KERNEL_DIR_ENV):
        return Path(os.environ[KERNEL_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "newllm" / "kernels"


def _cpu_problem() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the half-weight kernel needs an x86-64 CPU (this is {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: torch's own reading of the CPU
        cap = torch.backends.cpu.get_cpu_capability()
        return None if cap in ("AVX2", "AVX512") else f"the CPU lacks AVX2 (torch says {cap})"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(cxx: str) -> Path:
    """The kernel's shared library, built into `kernel_dir` unless a build of this source for
    this torch and compiler is there already. Written under a temporary name and renamed, so
    processes building at once never load a half-written file."""
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"|".join([source, torch.__version__.encode(), cxx.encode(),
                                    " ".join(FLAGS + [abi]).encode(),
                                    sys.version.encode()])).hexdigest()[:20]
    folder = kernel_dir()
    target = folder / f"matvec_f16-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".matvec_f16-", suffix=".so", dir=folder)
    os.close(fd)
    cmd = [cxx, *FLAGS, abi, str(SOURCE), "-o", tmp]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    for p in cpp_extension.library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch_cpu"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise HalfWeightsUnavailable(f"building the half-weight kernel failed ({cxx}): "
                                         f"{done.stderr.strip()[-1500:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HalfWeightsUnavailable(f"building the half-weight kernel failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the half-weight kernel in %.1f s: %s", time.perf_counter() - t0, target)
    return target


def load_kernel() -> Path:
    """Build (once, cached) and load ``newllm::matvec_f16``; its path. Raises
    `HalfWeightsUnavailable` saying why when it cannot run here."""
    global _fake_registered
    with _lock:
        if "path" in _loaded:
            return _loaded["path"]
        if "error" in _loaded:
            raise HalfWeightsUnavailable(_loaded["error"])
        try:
            problem = _cpu_problem()
            cxx = _compiler()
            if problem is None and cxx is None:
                problem = "no C++ compiler found (set CXX, or install g++)"
            if problem is not None:
                raise HalfWeightsUnavailable(problem)
            assert cxx is not None
            path = _build(cxx)
            torch.ops.load_library(str(path))
        except HalfWeightsUnavailable as e:
            _loaded["error"] = str(e)
            raise
        if not _fake_registered:  # once per process, whatever `_loaded` says
            torch.library.register_fake("newllm::matvec_f16")(_matvec_f16_shape)
            _fake_registered = True
        _loaded["path"] = path
        return path


def kernel_problem() -> str | None:
    """None when the kernel runs here (building it if needed), else why it does not."""
    try:
        load_kernel()
    except HalfWeightsUnavailable as e:
        return str(e)
    return None


def _matvec_f16_shape(x: Tensor, w: Tensor) -> Tensor:
    """The kernel's output for torch.compile's tracing: (N, O) float32."""
    return x.new_empty((x.shape[0], w.shape[0]))


def matvec_f16(x: Tensor, w: Tensor) -> Tensor:
    """x (N, I) float32 @ w (O, I) float16 -> (N, O) float32, by the kernel."""
    load_kernel()
    return torch.ops.newllm.matvec_f16(x, w)


class HalfWeightLinear(nn.Linear):
    """An `nn.Linear` whose weight is kept in float16 and used in float32 (module docstring):
    made by `convert`, never constructed directly."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (w.dtype != torch.float16 or x.dtype != torch.float32 or x.device.type != "cpu"
                or x.numel() > KERNEL_ROWS * self.in_features):  # prefill: the GEMM
            return F.linear(x, w.to(x.dtype), self.bias)
        y = torch.ops.newllm.matvec_f16(x.reshape(-1, self.in_features), w)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def lossless(model: Any) -> bool:
    """Whether every matrix `convert` keeps in float16 holds float16 values already (a
    checkpoint stored in float16, as the bundled one and pythia's are): then half weights
    round nothing, and the model computed is the checkpoint's in float32."""
    with torch.no_grad():
        return all(torch.equal(w, w.to(torch.float16).to(w.dtype))
                   for w in model._matvec_weights())


def auto_problem(model: Any) -> str | None:
    """Why the default (``--half-weights`` not given either way) leaves ``model``'s weights as
    they are; None when it keeps them in float16 (`auto`). It does for a float32 or float16
    model on the CPU whose matrices are float16 values (`lossless`) where the kernel runs."""
    if model.device.type != "cpu":
        return f"the model is on {model.device.type}"
    if model.dtype not in (torch.float32, torch.float16):
        return f"the model computes in {str(model.dtype).removeprefix('torch.')}"
    if not lossless(model):
        return "the weights are not float16 values (float16 would round them)"
    return kernel_problem()


def auto(model: Any) -> tuple[Any, str]:
    """The default for a model loaded in its stored dtype: half weights where they lose nothing
    (`auto_problem`), the model computed in float32 (a float16 model is converted up first);
    returns the model and one line for the log saying what was chosen and why."""
    if model.half_weights:
        return model, "linear weights kept in float16 already"
    problem = auto_problem(model)
    if problem is not None:
        return model, f"weights as loaded, not kept in float16: {problem}"
    if model.dtype != torch.float32:
        model.float()  # exact: float16 values are float32 values
    convert(model)
    return model, ("linear weights kept in float16, computed in float32: they are float16 "
                   "values, so nothing is rounded (--no-half-weights to turn this off)")


def convert(model: Any) -> Any:
    """Keep ``model``'s matrix weights (`TransformerLM._matvec_linears`) in float16 and compute
    with them in float32; the model. Its `checkpoint_fingerprint` stays that of the weights
    before (as for ``model.half()``), its `fingerprint` records the new dtypes."""
    if model.device.type != "cpu":
        raise ValueError(f"half weights are for decoding on the CPU; this model is on "
                         f"{model.device.type}")
    if model.dtype != torch.float32:
        raise ValueError(f"half weights need a float32 model (they compute in float32); this "
                         f"one is {str(model.dtype).removeprefix('torch.')}")
    load_kernel()
    checkpoint = model.checkpoint_fingerprint()
    with torch.no_grad():
        for m in model._matvec_linears():
            m.weight.data = m.weight.data.to(torch.float16).contiguous()
            m.weight.requires_grad_(False)
            m.__class__ = HalfWeightLinear
    model.remember_checkpoint(checkpoint)
    return model
