"""Weight-only quantised experts: int8 per output channel, int4 per group, on PyTorch's and moekit's CPU kernels.

A weight matrix W [out, in] (``x @ W.T``) is stored as

* **int8**: ``q`` int8 [out, in] and ``scales`` [out]: W = q * scale (symmetric, per output channel);
* **int4**: ``q`` uint8 [out, in / 2], two 4-bit values per byte (even column in the low nibble), and
  ``scales``, ``zeros`` [out, in / group] in bf16: W = (q - 8) * scale + zero, per group of ``group`` columns
  (asymmetric: zero = the group's minimum + 8 * scale, the convention ATen's int4 kernel takes).

The stored form is portable (plain bytes). A few rows run on PyTorch's CPU kernels:
``torch.ops.aten._weight_int8pack_mm`` takes the int8 form as is, ``_weight_int4pack_mm_for_cpu`` a repacked
copy made at first use (:func:`int4_kernel_weight`) and [in / group, out, 2] scales-and-zeros; both want bf16
activations (fp32 ones were measured 2-3x slower for int8), so inputs are cast to bf16 and the result back.
Their time grows by a full read of the weight per row, so from :data:`DENSE_MIN_ROWS` rows on (prompts) the
matrix is dequantised to bf16 for the call and multiplied by one GEMM instead (the copy is dropped after it).
Decode steps (one row) run moekit's native kernels on the stored form where they are built
(:mod:`moekit.nn.kernels.native`: one call for a token's experts, read in the stored form): where the CPU has
AVX512-VNNI, those of :mod:`moekit.nn.kernels.native.qdot`, on int8-quantised activations (``MOEKIT_QDOT=0``:
decode.c's, which match ATen's kernels up to the order of fp32 sums).
:meth:`QuantMatrix.dequantize` is the slow reference every kernel is tested against.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.nn.config import Activation
from moekit.nn.experts import Experts
from moekit.nn.kernels import native
from moekit.nn.kernels.fused_experts import activate
from moekit.nn.kernels.grouped_mm import cast, compute_dtype, expert_slices
from moekit.nn.kernels.native import qdot
from moekit.nn.kernels.schedule import run_jobs

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_ACT = torch.bfloat16  # the activation dtype both kernels are fast in
SCALE_DTYPE = torch.bfloat16  # scales and zeros: what both kernels take
# Rows from which QuantMatrix.forward dequantises the matrix for the call (native kernel: bf16, bit for bit the
# reference rounded) and runs one GEMM instead of the weight-only kernel, whose time grows by about a read of the
# whole weight per row. Measured (benchmarks/quant_prefill.py --sweep): one expert of the 1.72B shape ([1024, 1024]
# then [1024, 512], group 32), bf16 rows, ms, min of 11, 2-core AMX box, 2 threads (1 thread):
#   rows                      1            8           12           16           32           64
#   int8 kernel   0.11 (0.15)  0.24 (0.38)  0.31 (0.52)  0.40 (0.73)  0.68 (1.34)  1.30 (2.53)
#   int8 GEMM     0.32 (0.50)  0.35 (0.56)  0.32 (0.54)  0.34 (0.56)  0.37 (0.61)  0.52 (0.78)
#   int4 kernel   0.09 (0.14)  0.21 (0.35)  0.29 (0.50)  0.36 (0.64)  0.66 (1.24)  1.28 (2.46)
#   int4 GEMM     0.31 (0.52)  0.32 (0.52)  0.33 (0.55)  0.35 (0.56)  0.41 (0.61)  0.50 (0.79)
# Without the native dequantiser (MOEKIT_NATIVE=0, torch ops, 2 threads) the GEMM path costs 0.8-1.1 ms (int8:
# q cast to bf16, scales on the output) and 7-8 ms (int4, via the fp32 reference) at any of these row counts.
DENSE_MIN_ROWS = {"int8": 16, "int4": 16, "int8 without native": 48, "int4 without native": 384}


class ExpertStack(typing.Protocol):
    """A stack of expert matrices: a tensor [E, ...], or anything whose item ``e`` is expert e's (e.g. read from
    a file when indexed)."""

    def __getitem__(self, e: int, /) -> torch.Tensor: ...


def is_quantized_tensor(name: str) -> bool:
    """Whether a state-dict name belongs to quantised experts or linears (their dtypes are their own)."""
    return ".experts.q_in." in name or ".experts.q_out." in name or ".quantized." in name


def check_spec(bits: int, group_size: int, in_features: int | None = None) -> None:
    """Raise ConfigError for an unsupported bit width or group size (or one that does not divide ``in_features``)."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not supported; use one of {BITS}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size={group_size!r} is not supported for int4; use one of {GROUP_SIZES}")
    if bits == 4 and in_features is not None and in_features % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the input width {in_features}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales bf16 [out]) with W ~ q * scale, scale = max |row| / 127 (rounded to bf16, the
    kernel's dtype, before q is chosen, so q fits the scale used)."""
    w = w.float().contiguous()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(SCALE_DTYPE)
    return torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in/2] packed, scales, zeros bf16 [out, in/group]) with W ~ (q - 8) * scale + zero
    (scale and zero rounded to bf16 first, as for int8)."""
    out_f, in_f = w.shape
    g = w.float().contiguous().view(out_f, in_f // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(SCALE_DTYPE)
    q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15)
    q = q.to(torch.uint8).view(out_f, in_f)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> [out, in] values 0..15 (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def int4_kernel_weight(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] packed nibbles -> ATen's CPU int4 operand, converted 64 rows at a time (its layout is blocked
    by 64 rows, so the blocks convert alone). Whole-matrix int32 temporaries, 8x the result, fragmented the heap:
    a 30B-shaped int4 model's batch-8 prompt was OOM-killed past 21 GB of anonymous memory; converted by blocks,
    the same prompt peaks at 6.5 GB."""
    rows = packed.shape[0]
    step = 64 if rows % 64 == 0 else rows
    out = torch.empty_like(packed)
    for start in range(0, rows, step):
        block = unpack_int4(packed[start : start + step]).to(torch.int32)
        out[start : start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, 1)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where its data is not 64-byte aligned (a mapped file's tensor can be anywhere)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


class QuantMatrix(nn.Module):
    """One quantised weight [out, in]; ``forward(x)`` = x @ W.T in x's dtype (see module docstring)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int = 32):
        super().__init__()
        check_spec(bits, group_size, in_features)
        self.out_features, self.in_features, self.bits, self.group_size = out_features, in_features, bits, group_size
        if bits == 8:
            self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE))
        else:
            groups = in_features // group_size
            self.register_buffer("q", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int = 32) -> QuantMatrix:
        """Quantise the float matrix ``w`` [out, in]."""
        m = cls(w.shape[0], w.shape[1], bits, group_size)
        if bits == 8:
            m.q, m.scales = quantize_int8(w)
        else:
            m.q, m.scales, m.zeros = quantize_int4(w, group_size)
        return m

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (``model.to(torch.float32)``) leave the quantised form as it is: every
        kernel reads bf16 scales and zeros (a cast there and back is exact). Kernel operands are remade."""
        super()._apply(fn, recurse)
        for name in ("scales", "zeros"):
            t = self._buffers.get(name)
            if t is not None and t.dtype != SCALE_DTYPE:
                self._buffers[name] = t.to(SCALE_DTYPE)
        self._kernel = None
        return self

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in fp32: the reference the kernels are tested against."""
        if self.bits == 8:
            return self.q.float() * self.scales.float()[:, None]
        q = unpack_int4(self.q).float().view(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes this matrix holds (weights and scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kernel is None:  # made once, at first use (the stored form is the portable one)
            if self.bits == 8:  # the int8 kernel reads its operands 64-byte aligned (unaligned: a crash)
                self._kernel = (_aligned(self.q), _aligned(self.scales.to(_ACT)))
            else:
                packed = int4_kernel_weight(self.q)
                scales_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous().to(_ACT)
                self._kernel = (packed, scales_zeros)
        return self._kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out] in x's dtype: the weight-only kernel, or from DENSE_MIN_ROWS rows one GEMM."""
        # ATen's int4 kernel packs output rows 16 at a time: other widths (a character vocabulary's head) dequantise
        if x.shape[0] >= self.dense_min_rows() or (self.bits == 4 and self.out_features % 16):
            return self.dense_forward(x)
        w, s = self._kernel_operands()
        a = (x if x.dtype == _ACT else x.to(_ACT)).contiguous()  # the int4 kernel refuses strided rows
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(a, w, s)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, w, self.group_size, s)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dense_min_rows(self) -> int:
        """Rows from which :meth:`forward` runs :meth:`dense_forward` (see DENSE_MIN_ROWS)."""
        return DENSE_MIN_ROWS[f"int{self.bits}" + ("" if native.library() is not None else " without native")]

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through W dequantised for this call only, one GEMM (bf16 where the CPU multiplies bf16 natively,
        else fp32; activations rounded to bf16 first, as the kernels take them); in x's dtype."""
        cdt = compute_dtype(_ACT, x.device)
        a = cast(cast(x, _ACT), cdt)
        zeros = self.zeros if self.bits == 4 else None
        w = native.dequantize(self.q, self.scales, zeros, self.group_size) if cdt == _ACT else None
        if w is None and self.bits == 8:  # int8 values are exact in bf16: the per-channel scales go on the output
            return cast(torch.mm(a, self.q.to(cdt).t()).mul_(self.scales.to(cdt)), x.dtype)
        return cast(torch.mm(a, (self.dequantize().to(cdt) if w is None else w).t()), x.dtype)


class QuantizedExperts(Experts):
    """A layer's experts with quantised weights, each expert at its own bit width (``bits[e]``).

    Inference only (no gradients). ``w_in`` / ``w_out`` do not exist here: the MoE layer runs these through
    :meth:`forward` and :meth:`run_one` (``fused_kernel = False``).
    """

    fused_kernel = False
    q_in: nn.ModuleList  # of QuantMatrix
    q_out: nn.ModuleList

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_hidden_size: int,
        activation: Activation | str,
        bits: list[int],
        group_size: int = 32,
    ):
        nn.Module.__init__(self)
        self.activation = Activation(activation)
        self.num_experts, self.hidden_size, self.expert_hidden_size = num_experts, hidden_size, expert_hidden_size
        if len(bits) != num_experts:
            raise ConfigError(f"bits has {len(bits)} entries for {num_experts} experts")
        width = 2 * expert_hidden_size if self.activation == Activation.SWIGLU else expert_hidden_size
        self.bits, self.group_size = list(bits), group_size
        # w_in[e] as [X, D] and w_out[e] as [D, H]: the [out, in] matrices of x @ w_in[e] and a @ w_out[e]
        self.q_in = nn.ModuleList(QuantMatrix(width, hidden_size, b, group_size) for b in bits)
        self.q_out = nn.ModuleList(QuantMatrix(hidden_size, expert_hidden_size, b, group_size) for b in bits)

    @classmethod
    def from_experts(cls, experts: Experts, bits: list[int], group_size: int = 32) -> QuantizedExperts:
        """Quantise float ``experts`` (w_in [E, D, X], w_out [E, H, D]), one expert at a time."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.activation = experts.activation
        q.num_experts, q.hidden_size = experts.num_experts, experts.hidden_size
        q.expert_hidden_size, q.bits, q.group_size = experts.expert_hidden_size, list(bits), group_size
        with torch.no_grad():
            q.q_in = nn.ModuleList(
                QuantMatrix.from_float(experts.w_in[e].t(), b, group_size) for e, b in enumerate(bits)
            )
            q.q_out = nn.ModuleList(
                QuantMatrix.from_float(experts.w_out[e].t(), b, group_size) for e, b in enumerate(bits)
            )
        return q

    def state_for(self, w_in: ExpertStack, w_out: ExpertStack) -> dict[str, torch.Tensor]:
        """This module's state dict for float stacks w_in [E, D, X] and w_out [E, H, D], quantised one
        expert at a time (for streaming a checkpoint: the float stacks need not become parameters; any sequence
        of the experts' matrices will do, e.g. one that reads each from a file when indexed)."""
        out: dict[str, torch.Tensor] = {}
        for e, b in enumerate(self.bits):
            for name, w in (("q_in", w_in[e].t()), ("q_out", w_out[e].t())):
                m = QuantMatrix.from_float(w, b, self.group_size)
                out.update({f"{name}.{e}.{k}": v for k, v in m.state_dict().items()})
        return out

    def nbytes(self) -> int:
        """Bytes of all experts' weights and scales."""
        return sum(m.nbytes() for m in [*self.q_in, *self.q_out])

    def inactive_parameters(self, runs: int) -> int:
        width = 2 * self.expert_hidden_size if self.activation == Activation.SWIGLU else self.expert_hidden_size
        per_expert = (width + self.expert_hidden_size) * self.hidden_size
        return per_expert * (self.num_experts - runs)

    def run_one(self, e: int, x_1D: torch.Tensor) -> torch.Tensor:
        return self.q_out[e](activate(self.q_in[e](x_1D), self.activation))

    def run_chosen(self, x_1D: torch.Tensor, experts: list[int], weights: list[float], y_1D: torch.Tensor) -> None:
        """As :meth:`Experts.run_chosen`: SwiGLU experts take the native kernel (one call, the stored form read
        as is), others :meth:`run_one` per expert."""
        if self.activation == Activation.SWIGLU and native.library() is not None:
            first, last = typing.cast(QuantMatrix, self.q_in[0]), typing.cast(QuantMatrix, self.q_out[-1])
            # rebuilt when the buffers are replaced (loading, a move or a cast: all experts at once)
            key = (first.q.data_ptr(), first.scales.data_ptr(), last.q.data_ptr(), last.scales.data_ptr())
            if getattr(self, "_table_key", None) != key:
                self._table = native.QuantTable(list(self.q_in), list(self.q_out), self.group_size)
                self._table_key = key
            if qdot.enabled() and qdot.swiglu_experts(x_1D, self._table, experts, weights, y_1D):
                return
            if native.swiglu_experts_quantized(x_1D.reshape(-1), self._table, experts, weights, y_1D):
                return
        super().run_chosen(x_1D, experts, weights, y_1D)

    def forward(self, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0) -> torch.Tensor:
        """Rows sorted by expert (``counts`` each) through their experts; ``dropout`` must be 0 (inference)."""
        if dropout:
            raise ConfigError("quantised experts are for inference: expert dropout is not supported")
        out = x_ND.new_empty(x_ND.shape[0], self.hidden_size)

        def job(s: tuple[int, int, int]) -> None:
            e, lo, hi = s
            out[lo:hi] = self.q_out[e](activate(self.q_in[e](x_ND[lo:hi]), self.activation))

        slices = list(expert_slices(counts))
        run_jobs(job, slices, x_ND.device, cost=[hi - lo for _, lo, hi in slices])
        return out

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert through the dequantised weights (the slow reference; analysis)."""
        w_in, w_out = typing.cast(QuantMatrix, self.q_in[e]), typing.cast(QuantMatrix, self.q_out[e])
        h = x_nD @ w_in.dequantize().t().to(x_nD.dtype)
        return activate(h, self.activation) @ w_out.dequantize().t().to(x_nD.dtype)


class QuantLinear(nn.Module):
    """An ``nn.Linear`` with a quantised weight (``quantized``, a :class:`QuantMatrix`) and a float bias: the
    attention projections and the output head of a model quantised with ``linear_bits``. One row runs on a
    native kernel (:mod:`moekit.nn.kernels.native`: qdot's, or decode.c's for int8), anything else on ATen's."""

    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 32, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantized = QuantMatrix(out_features, in_features, bits, group_size)
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 32) -> QuantLinear:
        """Quantise a float ``nn.Linear``."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.quantized = QuantMatrix.from_float(linear.weight.detach(), bits, group_size)
        q.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.quantized
        y = None
        if x.numel() == x.shape[-1] and not torch.is_grad_enabled():
            if qdot.enabled():
                y = qdot.gemv(m, x)
            elif m.bits == 8:
                y = native.gemv_int8(m.q, m.scales, x.reshape(-1))
        if y is None:
            y = m(x.reshape(-1, x.shape[-1]))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)
