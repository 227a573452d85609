"""One batch-1 decode step of a block's attention half and router through ``step.c``'s ``moekit_block_step``.

:class:`BlockPlan` reads a :class:`moekit.nn.block.Block` once: the data pointers of its norms, projections and
router, in the slot order ``step.c`` declares. :func:`unsupported` says which blocks it covers; the caller runs
PyTorch's path for any other, and the tests compare the two.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from moekit.nn.attention import Attention, QKNorm
from moekit.nn.block import Block
from moekit.nn.config import RouterType
from moekit.nn.executor import LocalExperts
from moekit.nn.kernels import native
from moekit.nn.kernels.native import qdot
from moekit.nn.moe import MoE
from moekit.nn.norm import RMSNorm
from moekit.nn.quantized import QuantLinear
from moekit.nn.router import SigmoidTopKRouter

BF16 = torch.bfloat16


class BlockPlan:
    """A block's pointers (``plan``, int64, step.c's P_* slots) and the tensors they point into (kept alive
    here). A dense block's router slots are 0: the kernel then stops after the post-attention norm."""

    def __init__(self, block: Block):
        attn = block.self_attn
        assert isinstance(attn, Attention)
        self.keep: list[torch.Tensor] = []
        projections: list[nn.Module] = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        weights: list[torch.Tensor | int] = []
        scales: list[torch.Tensor | int] = []
        zeros: list[torch.Tensor | int] = []
        biases: list[torch.Tensor | int] = []
        for p in projections:
            if isinstance(p, QuantLinear):
                m = p.quantized
                weights.append(m.q)
                scales.append(self._hold(m.scales.to(BF16).contiguous()))
                zeros.append(self._hold(m.zeros.to(BF16).contiguous()) if m.bits == 4 else 0)
            else:
                assert isinstance(p, nn.Linear)
                weights.append(p.weight)
                scales.append(0)
                zeros.append(0)
            bias = p.bias
            assert bias is None or isinstance(bias, torch.Tensor)
            biases.append(0 if bias is None else self._hold(bias.to(BF16).contiguous()))
        norms = [block.input_layernorm.weight, block.post_attention_layernorm.weight]
        qk = [attn.q_norm.weight, attn.k_norm.weight] if attn.qk_norm == QKNorm.HEAD else [0, 0]
        router: list[torch.Tensor | int] = [0, 0]
        if isinstance(block.mlp, MoE):
            r = block.mlp.router
            selection_bias = r.e_score_correction_bias if isinstance(r, SigmoidTopKRouter) else 0
            router = [typing.cast(torch.Tensor, r.weight), selection_bias]
        slots = [*weights, *scales, *biases, *norms, *qk, *router, *zeros]  # step.c's P_* order
        self.plan = torch.tensor([s.data_ptr() if isinstance(s, torch.Tensor) else s for s in slots])
        self.keep += [t for t in slots if isinstance(t, torch.Tensor)]

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        self.keep.append(t)
        return t

    @staticmethod
    def key_of(block: Block) -> tuple:
        """What a plan depends on: the modules it reads, their hooks and their tensors' data pointers. A plan
        built when its block's key was different is stale (an adapter, a cast, a load) and must be rebuilt."""
        modules = _modules(block)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
        experts = block.mlp.experts if isinstance(block.mlp, MoE) else None
        tensors: list[torch.Tensor] = [t for m in modules[1:] if m is not experts for t in m.parameters(recurse=False)]
        tensors += [t for m in modules[1:] if m is not experts for t in m.buffers(recurse=False)]
        return (*map(id, modules), hooks, *(t.data_ptr() for t in tensors))


def _modules(block: Block) -> list[nn.Module]:
    """The block and the submodules the native step reads (experts and dense MLPs run as they are)."""
    attn, mlp = block.self_attn, block.mlp
    if not isinstance(attn, Attention):  # a block the step does not cover: its key need only notice a change
        return [block, attn, mlp]
    projections: list[nn.Module] = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    quantized: list[nn.Module] = [p.quantized for p in projections if isinstance(p, QuantLinear)]
    norms: list[nn.Module] = [block.input_layernorm, block.post_attention_layernorm]
    norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    routed: list[nn.Module] = [mlp, mlp.router, mlp.experts] if isinstance(mlp, MoE) else [mlp]
    return [block, attn, *projections, *quantized, *norms, *routed]


def unsupported(block: nn.Module) -> str | None:
    """Why ``block`` cannot take the native step (None: it can)."""
    if type(block) is not Block:
        return "not a pre-norm block"
    attn, mlp = block.self_attn, block.mlp
    if type(attn) is not Attention or attn.qk_norm == QKNorm.FULL:
        return "attention other than grouped-query attention with per-head or no QK-norm"
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    plain = all(type(p) is nn.Linear and p.weight.dtype == BF16 and p.weight.is_contiguous() for p in projections)
    quantized = {_attention_bits(p) for p in projections}
    bits = next(iter(quantized)) if len(quantized) == 1 else None
    if not plain and bits is None:
        return "attention projections are not all bf16 or all quantised alike"
    if not plain and bits and bits[0] == 4 and (attn.q_proj.in_features % 128 or attn.o_proj.in_features % 128):
        return "int4 attention with widths that are not whole 128-column blocks"
    norms = [block.input_layernorm, block.post_attention_layernorm]
    if attn.qk_norm == QKNorm.HEAD:
        norms += [attn.q_norm, attn.k_norm]
    if any(type(n) is not RMSNorm or n.weight.dtype != BF16 for n in norms):
        return "norms other than bf16 RMSNorm"
    if any(m._forward_hooks or m._forward_pre_hooks for m in _modules(block)):
        return "forward hooks on the block or its parts"
    return None if not isinstance(mlp, MoE) else _unsupported_moe(mlp)


def _attention_bits(p: nn.Module) -> tuple[int, int] | None:
    """(bits, group size) of a quantised projection the step reads (int8; int4 with contiguous buffers)."""
    if not isinstance(p, QuantLinear):
        return None
    m = p.quantized
    buffers = [m.q, m.scales] + ([m.zeros] if m.bits == 4 else [])
    if not all(b.is_contiguous() for b in buffers):
        return None
    return (m.bits, m.group_size if m.bits == 4 else 0)


def _unsupported_moe(moe: MoE) -> str | None:
    cfg = moe.config
    if cfg.router not in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK) or cfg.n_group > 1:
        return "a router other than softmax or sigmoid top-k without groups"
    if cfg.capacity_factor is not None or moe.zero_computation is not None or moe.gating_residual is not None:
        return "capacity limits, MoE++ experts or a gating residual"
    if type(moe.executor) is not LocalExperts or moe.replay is not None:
        return "experts elsewhere or router replay"
    router = moe.router
    if getattr(router, "bias", None) is not None or router.weight.dtype not in (BF16, torch.float32):
        return "a router with a bias or a weight neither bf16 nor fp32"
    if isinstance(router, SigmoidTopKRouter) and router.e_score_correction_bias.dtype not in (BF16, torch.float32):
        return "a selection bias neither bf16 nor fp32"
    return None


def _attention_signature(block: Block) -> tuple:
    attn = block.self_attn
    assert isinstance(attn, Attention)
    qk_eps = attn.q_norm.eps if attn.qk_norm == QKNorm.HEAD else None
    shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, _attention_bits(attn.q_proj))
    return (*shape, block.input_layernorm.eps, qk_eps)


def _router_signature(moe: MoE) -> tuple:
    c, r = moe.config, moe.router
    bias = r.e_score_correction_bias.dtype if isinstance(r, SigmoidTopKRouter) else None
    return (c.num_experts, c.top_k, c.router, c.norm_topk_prob, c.routed_scaling_factor, r.weight.dtype, bias)


def follow_qdot(step: Step) -> None:
    """Quantised attention computes as QuantLinear's one-row path does: on int8-quantised activations where
    qdot's kernels are on (``MOEKIT_QDOT``, read each step as the layers read it), else as ATen's kernels."""
    on = qdot.enabled()
    if bool(step.dims[-1]) != on:
        step.dims[-1] = on


def same_shape(blocks: list[Block]) -> bool:
    """Whether the blocks share the sizes and constants that :class:`Step` holds once (one eps for all norms
    but QK-norm's, one router setup for all MoE blocks)."""
    attention = {_attention_signature(b) for b in blocks}
    routers = {_router_signature(b.mlp) for b in blocks if isinstance(b.mlp, MoE)}
    eps = {b.input_layernorm.eps for b in blocks} | {b.post_attention_layernorm.eps for b in blocks}
    return len(attention) == 1 and len(routers) <= 1 and len(eps) == 1


class Step:
    """Model-wide sizes, constants and scratch for :func:`run` (one per model shape and cache length), and
    each layer's output rows: ``hn`` [L, D], and for MoE layers ``chosen``, ``weights`` [L, K], ``logits``
    [L, E] and ``entropy`` [L]."""

    def __init__(self, blocks: list[Block], max_length: int):
        attn = blocks[0].self_attn
        assert isinstance(attn, Attention)
        moe = next((b.mlp for b in blocks if isinstance(b.mlp, MoE)), None)
        H, G, hd, D, L = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.q_proj.in_features, len(blocks)
        E, K, sigmoid, norm_topk, routed_scale, router_fp32 = 1, 1, False, False, 1.0, False
        if moe is not None:
            c = moe.config
            E, K, sigmoid, norm_topk = (
                c.num_experts,
                c.top_k,
                c.router == RouterType.SIGMOID_TOPK,
                bool(c.norm_topk_prob),
            )
            routed_scale, router_fp32 = c.routed_scaling_factor, moe.router.weight.dtype == torch.float32
        bits, group = _attention_bits(attn.q_proj) or (0, 0)
        router = None if moe is None else moe.router
        bias_bf16 = isinstance(router, SigmoidTopKRouter) and router.e_score_correction_bias.dtype == BF16
        dims = [D, H, G, hd, E, K, max_length, sigmoid, norm_topk, bits, router_fp32, bias_bf16, group, False]
        self.dims = torch.tensor(dims, dtype=torch.int64)
        qk_eps = attn.q_norm.eps if attn.qk_norm == QKNorm.HEAD else 0.0
        eps = blocks[0].input_layernorm.eps
        self.consts = torch.tensor([eps, qk_eps, attn.scale, routed_scale], dtype=torch.float32)
        self.work16 = torch.empty((2 * H + 2 * G) * hd, dtype=BF16)
        self.work32 = torch.empty(H * max_length, dtype=torch.float32)
        self.hn = torch.empty(L, D, dtype=BF16)
        self.chosen = torch.zeros(L, K, dtype=torch.int64)
        self.weights = torch.empty(L, K, dtype=torch.float32)
        self.logits = torch.empty(L, E, dtype=torch.float32)
        self.entropy = torch.empty(L, dtype=torch.float32)
        shared = [self.dims, self.consts]
        rows = [self.hn, self.chosen, self.weights, self.logits]
        # each layer's pointers, in the kernel's argument order around the per-step ones
        self.pointers = [
            ([t.data_ptr() for t in shared], [r[i].data_ptr() for r in rows] + [self.entropy[i:].data_ptr()])
            for i in range(L)
        ]
        self.scratch = [self.work16.data_ptr(), self.work32.data_ptr()]


def run(
    step: Step,
    plan: BlockPlan,
    layer: int,
    kv: torch.Tensor,
    x_D: torch.Tensor,
    y_prev_D: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: int,
) -> None:
    """Layer ``layer``'s step: x_D (bf16, the residual) += attention, step.hn[layer] = its post-attention norm,
    and for an MoE layer the router's choices, weights, logits and entropy into step's rows (see
    ``moekit_block_step``)."""
    lib = native.library()
    assert lib is not None
    shared, rows = step.pointers[layer]
    y = None if y_prev_D is None else y_prev_D.data_ptr()
    lib.moekit_block_step(
        plan.plan.data_ptr(), *shared, kv.data_ptr(), x_D.data_ptr(), y, cos.data_ptr(), sin.data_ptr(), position,
        *rows, *step.scratch, torch.get_num_threads(),
    )  # fmt: skip


def residual_add(x_D: torch.Tensor, y_D: torch.Tensor) -> None:
    """x_D = bf16(x_D + bf16(y_D)) in place (the last block's residual add)."""
    lib = native.library()
    assert lib is not None
    lib.moekit_residual_add(x_D.data_ptr(), y_D.data_ptr(), x_D.numel())
