"""Hand-written CPU kernels for decode steps (bf16, int8 and int4 weights), compiled from C on first use
(every ``*.c`` beside this file, built into one library).

Why C: a decode step is bound by reading weights, and ATen runs each expert's GEMV as its own parallel
call; one call per layer over the chosen experts, on the CPU's bf16 dot instruction, decodes a 1.72B bf16
MoE 1.39x faster (``benchmarks/big_model.py``: 27.0 vs 19.5 tok/s). The library is built with the system C
compiler (``cc -O3 -march=native -fopenmp``) into ``$MOEKIT_KERNEL_CACHE`` (default ``~/.cache/moekit/kernels``),
keyed by the source's hash, and loaded with ctypes: no Python headers or torch C++ build. It is used only
where it is built for this CPU (AVX512-BF16); with no compiler, another CPU, or ``MOEKIT_NATIVE=0`` every
caller runs its ATen path, which the tests compare these kernels against.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCES = sorted(Path(__file__).parent.glob("*.c"))
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    return Path(os.environ.get("MOEKIT_KERNEL_CACHE") or Path.home() / ".cache" / "moekit" / "kernels")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be used here (see the module docstring)."""
    if os.environ.get("MOEKIT_NATIVE", "1") == "0" or not _cpu_has_avx512_bf16():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    sources = b"".join(p.name.encode() + p.read_bytes() for p in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(sources + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    path = cache_dir() / f"decode-{key}.so"
    if not path.is_file() and not _compile(compiler, path):
        return None
    lib = ctypes.CDLL(str(path))
    if not lib.moekit_native_ok():
        return None
    lib.moekit_gemv_bf16.argtypes = [_P, _I64, _P, _I64, _I64, _P, ctypes.c_int]
    lib.moekit_swiglu_experts_bf16.argtypes = [_P, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P]
    lib.moekit_swiglu_experts_bf16.argtypes += [_P, ctypes.c_int]
    lib.moekit_gemv_int8.argtypes = [_P, _P, _P, _I64, _I64, _P, ctypes.c_int]
    lib.moekit_swiglu_experts_quant.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P]
    lib.moekit_swiglu_experts_quant.argtypes += [_P, _P, ctypes.c_int]
    lib.moekit_dequant_int8_bf16.argtypes = [_P, _P, _I64, _I64, _P, ctypes.c_int]
    lib.moekit_dequant_int4_bf16.argtypes = [_P, _P, _P, _I64, _I64, _I64, _P, ctypes.c_int]
    lib.moekit_block_step.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.moekit_residual_add.argtypes = [_P, _P, _I64]
    if lib.moekit_qdot_ok():  # qdot.c: built where the CPU has AVX512-VNNI
        lib.moekit_qgemv.argtypes = [_P, ctypes.c_int32, _I64, _P, _I64, _I64, _P, ctypes.c_int]
        lib.moekit_swiglu_experts_q8act.argtypes = [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, ctypes.c_int]
    return lib


def _cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to know cheaply, so no native kernels
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


def _compile(compiler: str, path: Path) -> bool:
    """Build the library into ``path`` (written under another name, then renamed: concurrent builds are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, timeout=120
        )
        if done.returncode != 0:
            return False
        os.replace(tmp, path)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def gemv_bf16(w_OI: torch.Tensor, x_I: torch.Tensor) -> torch.Tensor | None:
    """bf16(w_OI @ x_I) for a bf16 weight with contiguous rows, or None where the kernel does not apply."""
    lib = library()
    if lib is None or not _rows_contiguous(w_OI) or not x_I.is_contiguous() or x_I.dtype != torch.bfloat16:
        return None
    out, inp = w_OI.shape
    y = torch.empty(out, dtype=torch.bfloat16)
    lib.moekit_gemv_bf16(w_OI.data_ptr(), w_OI.stride(0), x_I.data_ptr(), out, inp, y.data_ptr(), _threads())
    return y


def gemv_int8(q_OI: torch.Tensor, scales_O: torch.Tensor, x_I: torch.Tensor) -> torch.Tensor | None:
    """bf16(scales * (q_OI @ x_I)) for an int8 weight (x rounded to bf16 first, as ATen's int8 kernel takes
    it), or None where the kernel does not apply."""
    lib = library()
    if lib is None or q_OI.dtype != torch.int8 or not q_OI.is_contiguous() or q_OI.device.type != "cpu":
        return None
    out, inp = q_OI.shape
    x = x_I.to(torch.bfloat16).float().contiguous()
    scales = scales_O.to(torch.bfloat16).contiguous()
    y = torch.empty(out, dtype=torch.bfloat16)
    lib.moekit_gemv_int8(q_OI.data_ptr(), scales.data_ptr(), x.data_ptr(), out, inp, y.data_ptr(), _threads())
    return y


def swiglu_experts_bf16(
    x_D: torch.Tensor,
    w_in_EXD: torch.Tensor,
    w_out_EDH: torch.Tensor,
    experts: list[int],
    weights: list[float],
    y_D: torch.Tensor,
) -> bool:
    """y_D (fp32) += sum_k weights[k] * expert_{experts[k]}(x_D), in the given order; False (y_D untouched)
    where the kernel does not apply. ``w_in_EXD`` is [E, 2H, D] (gate rows then up rows), ``w_out_EDH``
    [E, D, H], both bf16 with contiguous rows."""
    lib = library()
    if (
        lib is None
        or x_D.dtype != torch.bfloat16
        or not x_D.is_contiguous()
        or y_D.dtype != torch.float32
        or not y_D.is_contiguous()
        or not (_rows_contiguous(w_in_EXD) and _rows_contiguous(w_out_EDH))
    ):
        return False
    _, width, dim = w_in_EXD.shape
    hidden = width // 2
    n = len(experts)
    chosen = torch.tensor(experts, dtype=torch.int64)
    scale = torch.tensor(weights, dtype=torch.float32)
    scratch = torch.empty(n * 3 * hidden, dtype=torch.bfloat16)
    lib.moekit_swiglu_experts_bf16(
        x_D.data_ptr(), w_in_EXD.data_ptr(), w_in_EXD.stride(0), w_in_EXD.stride(1),
        w_out_EDH.data_ptr(), w_out_EDH.stride(0), w_out_EDH.stride(1), dim, hidden, n,
        chosen.data_ptr(), scale.data_ptr(), y_D.data_ptr(), scratch.data_ptr(), scratch[n * 2 * hidden :].data_ptr(),
        _threads(),
    )  # fmt: skip
    return True


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """A quantised matrix in moekit.nn.quantized's stored form (int8 ``q`` [O, I] with ``scales`` [O], or int4
    ``q`` [O, I/2] packed with ``scales`` and ``zeros`` [O, I/group], all bf16) dequantised to bf16 [O, I]: its
    fp32 reference rounded to bf16, bit for bit. None where the kernel does not apply."""
    lib = library()
    tensors = [q, scales] + ([] if zeros is None else [zeros])
    if lib is None or not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        return None
    int8 = q.dtype == torch.int8 and zeros is None
    out_f, in_f = q.shape[0], q.shape[1] * (1 if int8 else 2)
    fits = in_f % 16 == 0 if int8 else (q.dtype == torch.uint8 and group % 32 == 0 and in_f % group == 0)
    if not fits or any(t.dtype != torch.bfloat16 for t in tensors[1:]):
        return None
    w = torch.empty(out_f, in_f, dtype=torch.bfloat16)
    if zeros is None:
        lib.moekit_dequant_int8_bf16(q.data_ptr(), scales.data_ptr(), out_f, in_f, w.data_ptr(), _threads())
    else:
        args = (q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out_f, in_f, group, w.data_ptr(), _threads())
        lib.moekit_dequant_int4_bf16(*args)
    return w


class QuantTable:
    """The data pointers and widths of a layer's quantised experts (q, scales, zeros of w_in, then of w_out,
    per expert), as the quantised expert kernels read them (decode.c's and qdot.c's). It holds the matrices it
    points into, so they outlive it; rebuild it when their buffers are replaced. ``readable``: every buffer a
    contiguous CPU tensor of its stored dtype, and each expert's two matrices of one width (what qdot.c needs);
    ``usable``: readable, and with int4 experts the widths multiples of 128 (decode.c's block)."""

    def __init__(self, matrices_in: list, matrices_out: list, group: int):
        self.matrices = [*matrices_in, *matrices_out]
        self.readable = all(map(readable, self.matrices)) and all(
            m.bits == o.bits for m, o in zip(matrices_in, matrices_out)
        )
        self.usable = self.readable and all(m.bits == 8 or m.in_features % 128 == 0 for m in self.matrices)
        rows = [matrix_pointers(m) + matrix_pointers(o) for m, o in zip(matrices_in, matrices_out)]
        self.table = torch.tensor(rows if self.readable else [], dtype=torch.int64)
        self.bits = torch.tensor([m.bits for m in matrices_in], dtype=torch.int32)
        self.group = group


def matrix_pointers(m) -> list[int]:
    """A quantised matrix's (q, scales, zeros) data pointers as the kernels take them (zeros 0 for int8)."""
    return [m.q.data_ptr(), m.scales.data_ptr(), m.zeros.data_ptr() if m.bits == 4 else 0]


def readable(m) -> bool:
    """Whether the kernels can read a quantised matrix as stored: contiguous CPU buffers of the stored dtypes."""
    buffers = [m.q, m.scales, *([m.zeros] if m.bits == 4 else [])]
    dtypes = [torch.int8 if m.bits == 8 else torch.uint8, torch.bfloat16, torch.bfloat16]
    return all(b.is_contiguous() and b.device.type == "cpu" and b.dtype == t for b, t in zip(buffers, dtypes))


def swiglu_experts_quantized(
    x_D: torch.Tensor, table: QuantTable, experts: list[int], weights: list[float], y_D: torch.Tensor
) -> bool:
    """y_D (fp32) += sum_k weights[k] * expert_{experts[k]}(x_D) for quantised SwiGLU experts (``table``), in
    the given order, as :meth:`moekit.nn.quantized.QuantizedExperts.run_one` computes each; False (y_D
    untouched) where the kernel does not apply."""
    lib = library()
    if lib is None or not table.usable or y_D.dtype != torch.float32 or not y_D.is_contiguous():
        return False
    m_in = table.matrices[0]
    dim, hidden, n, group = m_in.in_features, m_in.out_features // 2, len(experts), table.group
    x16 = x_D.to(torch.bfloat16).contiguous()  # the bf16 activations ATen's kernels take
    x = x16.float()
    chosen = torch.tensor(experts, dtype=torch.int64)
    scale = torch.tensor(weights, dtype=torch.float32)
    floats = torch.empty(n * 3 * hidden + (dim + n * hidden) // group + 1, dtype=torch.float32)
    halves = torch.empty(dim + n * hidden, dtype=torch.bfloat16)
    lib.moekit_swiglu_experts_quant(
        x.data_ptr(), x16.data_ptr(), table.table.data_ptr(), table.bits.data_ptr(), group, dim, hidden, n,
        chosen.data_ptr(), scale.data_ptr(), y_D.data_ptr(), floats.data_ptr(),
        floats[2 * n * hidden :].data_ptr(), halves.data_ptr(), halves[dim:].data_ptr(),
        floats[3 * n * hidden :].data_ptr(), _threads(),
    )  # fmt: skip
    return True


def _rows_contiguous(w: torch.Tensor) -> bool:
    return w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.stride(-1) == 1


def _threads() -> int:
    return torch.get_num_threads()
