"""A batch-1 decode step of a bf16 (or int8-attention) MoE language model on the native step kernel.

Through PyTorch a decode step of one token runs ~200 small ops per layer; on the 1.72B shape they cost about
10 ms of a 35 ms step (``benchmarks/decode_profile.py``). Here each block is one native call for its attention
half and router (:mod:`moekit.nn.kernels.native.step`), then the experts' own decode kernels
(:func:`moekit.nn.few_tokens.run_token`), so a step runs a few Python calls per layer.

:func:`forward` returns None whenever the step is not of that kind (more than one token or row, a padded cache,
no native kernels, a block it does not cover; see :func:`moekit.nn.kernels.native.step.unsupported`) and
:meth:`MoELM.forward` then takes its usual path, which the tests compare this one against.
"""

from __future__ import annotations

import typing
import weakref
from typing import TYPE_CHECKING

import torch

from moekit.nn import few_tokens
from moekit.nn.attention import KVCache
from moekit.nn.block import Block
from moekit.nn.gemv import linear
from moekit.nn.kernels import native
from moekit.nn.kernels.native import step as native_step
from moekit.nn.moe import MoE
from moekit.nn.routing import MoEAux

if TYPE_CHECKING:  # lm imports this module
    from moekit.models.lm import LMOutput, MoELM


class _Plans:
    """A model's block plans and step scratch (for one cache length)."""

    def __init__(self, blocks: list[Block], max_length: int):
        self.blocks = blocks
        self.plans = [native_step.BlockPlan(b) for b in blocks]
        self.step = native_step.Step(blocks, max_length)
        self.max_length = max_length
        self.moe_layers = [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoE)]


class _Entry:
    """What :func:`_plans` remembers of a model: its blocks' keys, the plans or the reason there are none, and
    the cache they were last checked for (a model is not changed halfway through a generation, so a step on
    the same cache skips the check)."""

    def __init__(self, keys: list[tuple], result: _Plans | str, cache: KVCache):
        self.keys, self.result, self.cache = keys, result, weakref.ref(cache)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Entry


def _plans(model: MoELM, cache: KVCache, max_length: int) -> _Plans | None:
    """The model's plans, rebuilt when a block's key changed (a refusal too: a removed hook, a new dtype)."""
    entry = _PLANS.get(model)
    if entry is not None and entry.cache() is cache:
        return None if isinstance(entry.result, str) else entry.result
    blocks = typing.cast(list[Block], list(model.layers))
    keys = [native_step.BlockPlan.key_of(b) for b in blocks]
    if entry is not None and entry.keys == keys:
        result = entry.result
        if isinstance(result, str) or result.max_length == max_length:
            _PLANS[model] = _Entry(keys, result, cache)
            return None if isinstance(result, str) else result
    reason = unsupported_reason(model)
    plans = _Plans(blocks, max_length) if reason is None else None
    _PLANS[model] = _Entry(keys, plans or typing.cast(str, reason), cache)
    return plans


def unsupported_reason(model: MoELM) -> str | None:
    """Why ``model``'s decode steps cannot take the native step (None: they can, where :func:`applies`)."""
    if native.library() is None:
        return "no native kernels on this machine"
    if model.embed_tokens.weight.dtype != torch.bfloat16:
        return "the model's weights are not bf16"
    blocks = list(model.layers)
    reason = next((r for r in map(native_step.unsupported, blocks) if r is not None), None)
    if reason is None and not native_step.same_shape(typing.cast(list[Block], blocks)):
        reason = "blocks of different shapes"
    return reason


def applies(model: MoELM, input_ids: torch.Tensor, cache: KVCache | None) -> bool:
    """Whether ``model(input_ids, cache=cache)`` may take the native step (the cheap checks)."""
    c = model.config
    return (
        cache is not None
        and input_ids.shape == (1, 1)
        and cache.max_length is not None
        and cache.mask is None
        and 0 < cache.length < cache.max_length
        and torch.is_inference_mode_enabled()
        and not model.training
        and model.embed_tokens.weight.dtype == torch.bfloat16
        and model.embed_tokens.weight.device.type == "cpu"
        and (c.sliding_window is None or cache.length + 1 <= c.sliding_window)
        and native.library() is not None
    )


def forward(model: MoELM, input_ids: torch.Tensor, cache: KVCache | None, logits_to_keep: int) -> LMOutput | None:
    """``model(input_ids, cache=cache, logits_to_keep=...)`` for one token of one row on the native step, or None
    where it does not apply. ``input_ids`` must be checked already (:meth:`MoELM.forward` does)."""
    from moekit.models.lm import LMOutput

    if not applies(model, input_ids, cache):
        return None
    assert cache is not None and cache.max_length is not None
    plans = _plans(model, cache, cache.max_length)
    if plans is None or not _cache_fits(cache, plans):
        return None
    P, step = cache.length, plans.step
    native_step.follow_qdot(step)
    x_D = model.embed_tokens(input_ids).reshape(-1).clone()  # the residual stream, written in place
    cos, sin = (t.reshape(-1).contiguous() for t in model.rotary_emb(torch.tensor([[P]]), torch.bfloat16))
    kv = torch.tensor([[_pointer(k), _pointer(v)] for k, v in zip(cache.keys, cache.values)], dtype=torch.int64)
    y_D = torch.zeros(x_D.shape[0], dtype=torch.float32)
    for i, (block, plan) in enumerate(zip(plans.blocks, plans.plans)):
        native_step.run(step, plan, i, kv[i], x_D, y_D if i else None, cos, sin, P)
        hn, ffn = step.hn[i : i + 1], block.mlp
        if not isinstance(ffn, MoE):  # a dense block
            y_D.copy_(ffn(hn).reshape(-1))
            continue
        y_D.zero_()
        few_tokens.run_token(ffn, hn, step.chosen[i].tolist(), step.weights[i].tolist(), y_D)
        if ffn.shared_experts is not None:
            y_D += ffn.shared_output(hn).reshape(-1).float()
    native_step.residual_add(x_D, y_D)
    cache.advance(1)
    h = model.norm(x_D.view(1, 1, -1))
    logits = linear(model.lm_head, h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
    zero = torch.zeros((), dtype=torch.float32)
    return LMOutput(logits=logits, loss=None, aux_loss=zero, moe_aux=_aux(step, plans.moe_layers), cache=cache)


def _pointer(t: torch.Tensor | None) -> int:
    assert t is not None, "checked by _cache_fits"
    return t.data_ptr()


def _cache_fits(cache: KVCache, plans: _Plans) -> bool:
    """Every layer's key/value buffer is the [1, G, max_length, hd] bf16 block the kernel writes into."""
    attn = plans.blocks[0].self_attn
    shape = (1, attn.num_kv_heads, plans.max_length, attn.head_dim)
    return all(
        t is not None and tuple(t.shape) == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
        for t in (*cache.keys, *cache.values)
    )


def _aux(step: native_step.Step, moe_layers: list[int]) -> list[MoEAux]:
    """Each MoE layer's MoEAux as the few-token path gives it (no losses; counts, entropy and gate logits)."""
    rows = torch.tensor(moe_layers)
    # copies: the next step reuses step's rows
    chosen, logits, entropy = step.chosen[rows], step.logits[rows], step.entropy[rows]
    counts = torch.zeros(len(moe_layers), logits.shape[1], dtype=torch.long)
    counts.scatter_add_(1, chosen, torch.ones_like(chosen))
    loss, zero = torch.zeros(()), torch.zeros((), dtype=torch.long)
    return [
        MoEAux(
            loss=loss,
            losses={},
            tokens_per_expert=counts[i],
            dropped_assignments=zero,
            dropped_tokens=zero,
            router_entropy=entropy[i],
            routing=None,
            gate_logits=logits[i : i + 1],
        )
        for i in range(len(moe_layers))
    ]
