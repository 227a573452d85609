"""The MoE layer's experts as one op: gather -> GEMM -> activation -> combine weight -> GEMM -> combine.

:func:`moe_experts` computes y[t] = sum over t's kept assignments n of weight_N[n] * expert_e(n)(x[t]),
plus the shared experts, with an implementation per device:

* CPU: one autograd Function, one expert at a time (on single-threaded workers or inline:
  :func:`moekit.nn.kernels.schedule.run_jobs`), so per-expert intermediates stay in cache and the
  [N, D] gathered input is never materialised or saved. The combine weight scales the activation (H wide)
  before the second GEMM, so its gradient needs no saved expert output. Backward recomputes the
  activation from the saved first-GEMM output and does, per expert, the down-projection grads, the
  activation grad and the up-projection grads in one pass. The shared experts ride along as row-chunk
  jobs of the same pool (their output is the base the routed outputs are added into).
* other devices: ``_moe_experts_grouped``, the same function from two grouped GEMMs
  (:func:`moekit.nn.kernels.grouped_mm.grouped_mm`: ``torch._grouped_mm`` on CUDA) and plain autograd.
  Oracle of both: :func:`moekit.nn.moe.reference_moe`.

Shape legend: T tokens, E experts, D hidden, H expert hidden, X = 2H (SwiGLU) or H (GELU),
N kept assignments sorted by expert, S shared-expert hidden.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from moekit.errors import ShapeError
from moekit.nn.config import Activation
from moekit.nn.kernels.grouped_mm import accumulate_dtype, cast, compute_dtype, grouped_mm, matmul, mm_into
from moekit.nn.kernels.schedule import intra_op_threads, run_jobs


def activate(h_NX: torch.Tensor, activation: Activation) -> torch.Tensor:
    """SwiGLU on [gate | up] halves, or GELU (the product in place on silu's fresh output: autograd-safe)."""
    if activation == Activation.SWIGLU:
        gate, up = h_NX.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return F.gelu(h_NX)


def _act_backward(h: torch.Tensor, grad_a: torch.Tensor, swiglu: bool, silu: torch.Tensor | None) -> torch.Tensor:
    """d(act)/dh given the activation's output grad (consumed); ``silu`` = silu(gate) for SwiGLU."""
    if not swiglu:
        return torch.ops.aten.gelu_backward(grad_a, h)
    assert silu is not None, "SwiGLU's backward needs silu(gate)"
    H = grad_a.shape[1]
    grad_h = torch.empty_like(h)
    torch.mul(grad_a, silu, out=grad_h[:, H:])
    torch.ops.aten.silu_backward.grad_input(grad_a.mul_(h[:, H:]), h[:, :H], grad_input=grad_h[:, :H])
    return grad_h


@dataclasses.dataclass
class _Plan:
    """The jobs of one call: routed expert slices and shared-expert row chunks."""

    counts: tuple[int, ...]
    swiglu: bool
    shared: bool
    threads: int
    jobs: list[tuple[int, int, int, int]]  # (kind 0 routed / 1 shared, expert or chunk, lo, hi)
    cost: list[int]
    fwd_jobs: list[tuple[int, int, int, int]]  # the same with few large experts split into row pieces
    fwd_cost: list[int]

    @staticmethod
    def build(counts, swiglu, T, routed_width, shared_width, threads):
        jobs, cost, start = [], [], 0
        for e, n in enumerate(counts):
            if n:
                jobs.append((0, e, start, start + n))
                cost.append(n * routed_width)
            start += n
        # Forward only (no weight gradients to split): with few experts per worker, cut them into row
        # pieces so the workers finish together (Mixtral: 8 experts on 2 workers).
        fwd_jobs, fwd_cost = list(jobs), list(cost)
        if threads > 1 and 0 < len(jobs) < 4 * threads:
            piece = max(64, -(-start // (4 * threads)))
            fwd_jobs, fwd_cost = [], []
            for _, e, lo, hi in jobs:
                for a in range(lo, hi, piece):
                    b = min(a + piece, hi)
                    fwd_jobs.append((0, e, a, b))
                    fwd_cost.append((b - a) * routed_width)
        if shared_width:
            # Enough chunks that the shared MLP spreads over the workers, each still a large GEMM.
            rows = max(128, -(-T // max(2 * threads, 1)))
            for c, lo in enumerate(range(0, T, rows)):
                job, job_cost = (1, c, lo, min(lo + rows, T)), (min(lo + rows, T) - lo) * shared_width
                jobs.append(job)
                cost.append(job_cost)
                fwd_jobs.append(job)
                fwd_cost.append(job_cost)
        return _Plan(counts, swiglu, bool(shared_width), threads, jobs, cost, fwd_jobs, fwd_cost)

    @property
    def shared_chunks(self) -> int:
        return sum(1 for kind, *_ in self.jobs if kind == 1)


def _forward(x_TD, token_idx_N, weight_N, w_in, w_out, sw_in, sw_out, sweight_T, mask_NH, plan: _Plan, saved=None):
    """The layer output [T, D] (acc dtype); fills ``saved`` = (h_NX, sh_TX) for backward when given."""
    T, D = x_TD.shape
    device = x_TD.device
    cdt = compute_dtype(x_TD.dtype, device)
    acc = accumulate_dtype(x_TD.dtype)
    o_ND = torch.empty(token_idx_N.shape[0], D, dtype=acc, device=device)
    # The shared experts' output is the base the routed outputs are added into.
    y_TD = torch.empty(T, D, dtype=acc, device=device) if plan.shared else torch.zeros(T, D, dtype=acc, device=device)
    h_NX, sh_TX = saved if saved is not None else (None, None)

    def job(j):
        kind, e, lo, hi = j
        if kind == 0:
            x_n = x_TD.index_select(0, token_idx_N[lo:hi])
            wi, wo, w, out, hbuf = w_in[e], w_out[e], weight_N, o_ND, h_NX
        else:
            x_n, wi, wo, w, out, hbuf = x_TD[lo:hi], sw_in, sw_out, sweight_T, y_TD, sh_TX
        x_n, wi, wo = cast(x_n, cdt), cast(wi, cdt), cast(wo, cdt)
        if hbuf is not None and hbuf.dtype == cdt:
            h = matmul(x_n, wi, out=hbuf[lo:hi])
        else:
            h = matmul(x_n, wi)
            if hbuf is not None:
                hbuf[lo:hi] = h
        a = activate(h, Activation.SWIGLU if plan.swiglu else Activation.GELU)
        if kind == 0 and mask_NH is not None:
            a.mul_(cast(mask_NH[lo:hi], cdt))
        if w is not None:
            a.mul_(cast(w[lo:hi], cdt).unsqueeze(1))
        mm_into(out[lo:hi], a, wo)

    run_jobs(job, plan.jobs, device, plan.cost, plan.threads, worker_jobs=plan.fwd_jobs, worker_cost=plan.fwd_cost)
    return y_TD.index_add_(0, token_idx_N, o_ND)


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_idx_N, weight_N, w_in, w_out, sw_in, sw_out, sweight_T, mask_NH, plan: _Plan):
        dt, dev = x_TD.dtype, x_TD.device
        h_NX = torch.empty(token_idx_N.shape[0], w_in.shape[-1], dtype=dt, device=dev)
        sh_TX = torch.empty(x_TD.shape[0], sw_in.shape[-1], dtype=dt, device=dev) if plan.shared else None
        args = (x_TD, token_idx_N, weight_N, w_in, w_out, sw_in, sw_out, sweight_T, mask_NH)
        y_TD = _forward(*args, plan, (h_NX, sh_TX))
        ctx.save_for_backward(*args, h_NX, sh_TX)
        ctx.plan = plan
        return cast(y_TD, dt)

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, token_idx_N, weight_N, w_in, w_out, sw_in, sw_out, sweight_T, mask_NH, h_NX, sh_TX = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need = ctx.needs_input_grad
        need_x = need[0]
        device = x_TD.device
        cdt = compute_dtype(x_TD.dtype, device)
        acc = accumulate_dtype(x_TD.dtype)
        grad_TD = grad_TD.contiguous()
        T, D = x_TD.shape
        chunks = plan.shared_chunks

        with intra_op_threads(1):
            empty = [e for e, n in enumerate(plan.counts) if n == 0]

            def expert_grad(w, needed):
                if not needed:
                    return None
                g = torch.empty_like(w)
                if empty:
                    g[empty] = 0
                return g

            grads = {
                "weight": torch.empty_like(weight_N) if need[2] else None,
                "w_in": expert_grad(w_in, need[3]),
                "w_out": expert_grad(w_out, need[4]),
                # Shared weight grads: one partial per row chunk, summed after the jobs.
                "sw_in": sw_in.new_empty(chunks, *sw_in.shape, dtype=acc) if plan.shared and need[5] else None,
                "sw_out": sw_out.new_empty(chunks, *sw_out.shape, dtype=acc) if plan.shared and need[6] else None,
                "sweight": torch.empty_like(sweight_T) if sweight_T is not None and need[7] else None,
            }
            grad_x_ND = torch.empty(token_idx_N.shape[0], D, dtype=acc, device=device) if need_x else None
            # The shared experts' input grad is the base the routed input grads are added into.
            if need_x:
                alloc = torch.empty if plan.shared else torch.zeros
                grad_x_TD = alloc(T, D, dtype=acc, device=device)
            else:
                grad_x_TD = None

        def job(j):
            kind, e, lo, hi = j
            if kind == 0:
                tok = token_idx_N[lo:hi]
                go, h, wi, wo, w = grad_TD.index_select(0, tok), h_NX[lo:hi], w_in[e], w_out[e], weight_N
                g_w, g_wi, g_wo = grads["weight"], grads["w_in"], grads["w_out"]
                gx = grad_x_ND
            else:
                go, h, wi, wo, w = grad_TD[lo:hi], sh_TX[lo:hi], sw_in, sw_out, sweight_T
                g_w, g_wi, g_wo = grads["sweight"], grads["sw_in"], grads["sw_out"]
                gx = grad_x_TD
            go, h, wi, wo = cast(go, cdt), cast(h, cdt), cast(wi, cdt), cast(wo, cdt)
            if plan.swiglu:
                H = h.shape[1] // 2
                silu = F.silu(h[:, :H])
                a = silu * h[:, H:]
            else:
                silu, a = None, F.gelu(h)
            mask = cast(mask_NH[lo:hi], cdt) if kind == 0 and mask_NH is not None else None
            if mask is not None:
                a.mul_(mask)  # the activation as the forward used it
            ga = torch.mm(go, wo.t())  # grad of the (weighted, dropped-out) activation
            if w is not None:
                w_n = cast(w[lo:hi], cdt).unsqueeze(1)
                if g_w is not None:
                    g_w[lo:hi] = (ga * a).sum(1)
                a.mul_(w_n)
                ga.mul_(w_n)
            if g_wo is not None:
                mm_into(g_wo[e], a.t(), go)
            if mask is not None:
                ga.mul_(mask)
            grad_h = _act_backward(h, ga, plan.swiglu, silu)
            if g_wi is not None:
                x_n = x_TD.index_select(0, tok) if kind == 0 else x_TD[lo:hi]
                mm_into(g_wi[e], cast(x_n, cdt).t(), grad_h)
            if gx is not None:
                mm_into(gx[lo:hi], grad_h, wi.t())

        run_jobs(job, plan.jobs, device, cost=plan.cost, threads=plan.threads)

        with intra_op_threads(1):
            grad_x = None
            if grad_x_TD is not None and grad_x_ND is not None:  # (both allocated when need_x)
                grad_x = cast(grad_x_TD.index_add_(0, token_idx_N, grad_x_ND), x_TD.dtype)
            g_swi = None if grads["sw_in"] is None else cast(grads["sw_in"].sum(0), sw_in.dtype)
            g_swo = None if grads["sw_out"] is None else cast(grads["sw_out"].sum(0), sw_out.dtype)
        return grad_x, None, grads["weight"], grads["w_in"], grads["w_out"], g_swi, g_swo, grads["sweight"], None, None


def moe_experts(
    x_TD: torch.Tensor,
    token_idx_N: torch.Tensor,
    weight_N: torch.Tensor,
    counts: tuple[int, ...],
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Activation | str = Activation.SWIGLU,
    shared_w_in: torch.Tensor | None = None,
    shared_w_out: torch.Tensor | None = None,
    shared_weight_T: torch.Tensor | None = None,
    threads: int | None = None,
    dropout_mask_NH: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum over n with token_idx_N[n] == t of weight_N[n] * expert_e(n)(x[t])  (+ shared(x[t])).

    ``token_idx_N`` [N] are the kept assignments' tokens sorted by expert, ``counts`` (python ints) the assignments
    per expert, ``weight_N`` [N] their combine weights (any float dtype). The optional shared-expert MLP
    (``shared_w_in`` [D, X_s], ``shared_w_out`` [S, D]; views are fine) is one more expert every token visits,
    scaled per token by ``shared_weight_T`` [T] when given (Qwen2-MoE's gate). ``dropout_mask_NH`` multiplies
    the routed experts' hidden activations (0 or 1 / (1 - p): :func:`expert_dropout_mask`). ``threads``: workers
    (default: this thread's intra-op threads). Returns [T, D] in x's dtype (the autocast dtype under autocast).
    """
    device = x_TD.device
    if torch.is_autocast_enabled(device.type):
        x_TD = x_TD.to(torch.get_autocast_dtype(device.type))
    dt = x_TD.dtype
    x_TD = x_TD.contiguous()
    w_in, w_out = cast(w_in, dt), cast(w_out, dt)
    shared_width = 0  # the shared experts' X_s + S, for the plan
    if shared_w_in is not None:
        assert shared_w_out is not None, "shared_w_in comes with shared_w_out"
        shared_w_in, shared_w_out = cast(shared_w_in, dt), cast(shared_w_out, dt)
        shared_width = shared_w_in.shape[-1] + shared_w_out.shape[-1]
    if dropout_mask_NH is not None and tuple(dropout_mask_NH.shape) != (token_idx_N.shape[0], w_out.shape[1]):
        raise ShapeError(
            f"dropout_mask_NH has shape {tuple(dropout_mask_NH.shape)}, expected "
            f"[assignments, expert hidden] = {[token_idx_N.shape[0], w_out.shape[1]]}"
        )
    args = (x_TD, token_idx_N, weight_N, w_in, w_out, shared_w_in, shared_w_out, shared_weight_T, dropout_mask_NH)
    with torch.autocast(device.type, enabled=False):
        if device.type != "cpu":
            return _moe_experts_grouped(*args, counts, activation)
        plan = _Plan.build(
            counts,
            Activation(activation) == Activation.SWIGLU,
            x_TD.shape[0],
            w_in.shape[-1] + w_out.shape[-1],
            shared_width,
            torch.get_num_threads() if threads is None else threads,
        )
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            return _MoEExperts.apply(*args, plan)
        return cast(_forward(*args, plan), dt)


def _moe_experts_grouped(
    x_TD, token_idx_N, weight_N, w_in, w_out, sw_in, sw_out, sweight_T, mask_NH, counts, activation
) -> torch.Tensor:
    """:func:`moe_experts` from two grouped GEMMs and plain autograd, its path off the CPU (x and the weights
    in one dtype, no autocast; the arguments in the order of the CPU kernel's)."""
    acc = accumulate_dtype(x_TD.dtype)
    a_NH = activate(grouped_mm(x_TD.index_select(0, token_idx_N), w_in, counts), activation)
    if mask_NH is not None:
        a_NH = a_NH * mask_NH.to(a_NH.dtype)
    # The combine weight scales the activation before the second GEMM, as in the CPU kernel.
    o_ND = grouped_mm(a_NH * weight_N.unsqueeze(1).to(a_NH.dtype), w_out, counts)
    if sw_in is None:
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    else:
        a_TS = activate(x_TD @ sw_in, activation)
        if sweight_T is not None:
            a_TS = a_TS * sweight_T.unsqueeze(1).to(a_TS.dtype)
        y_TD = (a_TS @ sw_out).to(acc)
    return y_TD.index_add(0, token_idx_N, o_ND.to(acc)).to(x_TD.dtype)
