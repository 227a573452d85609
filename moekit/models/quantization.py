"""Quantised experts in a language model: the spec saved in config.json, swapping a model's experts for
:class:`~moekit.nn.quantized.QuantizedExperts`, and choosing each expert's bit width from its routed load.

The spec (``config.json``'s ``"quantization"``)::

    {"method": "weight-only", "group_size": 32, "bits": {"1": [8, 4, 4, ...], "2": [...]}}

maps every MoE layer to one bit width per expert (8 = int8 per channel, 4 = int4 per group). An optional
``"linear_bits": 8`` (or 4) also quantises the attention projections (q, k, v, o of standard attention) and
the output head unless it is tied to the embeddings (:class:`~moekit.nn.quantized.QuantLinear`); routers,
norms and embeddings stay float.
"""

from __future__ import annotations

import typing
from typing import Any

import torch

from moekit.errors import CheckpointError, ConfigError
from moekit.models.config import LMConfig
from moekit.nn.attention import Attention
from moekit.nn.moe import MoE
from moekit.nn.quantized import QuantizedExperts, QuantLinear, check_spec


def uniform_spec(config: LMConfig, bits: int, group_size: int = 32, linear_bits: int | None = None) -> dict[str, Any]:
    """Every expert of every MoE layer of a model of ``config`` at ``bits`` (and the linears at ``linear_bits``)."""
    check_spec(bits, group_size)
    layers = {str(i): [bits] * config.moe_config(i).num_experts for i in config.sparse_layers}  # type: ignore[union-attr]
    return _with_linears({"method": "weight-only", "group_size": group_size, "bits": layers}, linear_bits)


def _with_linears(spec: dict[str, Any], linear_bits: int | None) -> dict[str, Any]:
    if linear_bits is not None:
        check_spec(linear_bits, spec["group_size"])
        spec["linear_bits"] = linear_bits
    return spec


def mixed_spec(
    loads: dict[int, torch.Tensor], fraction_8bit: float, group_size: int = 32, linear_bits: int | None = None
) -> dict[str, Any]:
    """Routing-aware precision: in each layer, the most-routed experts (by ``loads[layer]`` [E], tokens routed
    in calibration) keep 8 bits, as many as ``fraction_8bit`` of the layer's experts; the rest get 4 bits."""
    if not 0.0 <= fraction_8bit <= 1.0:
        raise ConfigError(f"the fraction of experts kept at 8 bits must be in [0, 1], got {fraction_8bit}")
    check_spec(4, group_size)
    bits = {}
    for layer, load in loads.items():
        keep = round(fraction_8bit * load.numel())
        order = torch.argsort(load.float(), descending=True, stable=True).tolist()
        chosen = [4] * load.numel()
        for e in order[:keep]:
            chosen[e] = 8
        bits[str(layer)] = chosen
    return _with_linears({"method": "weight-only", "group_size": group_size, "bits": bits}, linear_bits)


def _moe_layers(model: torch.nn.Module) -> list[tuple[int, MoE]]:
    blocks = typing.cast(torch.nn.ModuleList, model.layers)
    return [(i, block.mlp) for i, block in enumerate(blocks) if isinstance(block.mlp, MoE)]


def _layer_bits(spec: dict[str, Any], model: torch.nn.Module) -> dict[int, list[int]]:
    """Validate ``spec`` against the model: one entry per MoE layer, one width per expert."""
    if not isinstance(spec, dict) or spec.get("method") != "weight-only" or not isinstance(spec.get("bits"), dict):
        raise CheckpointError(f"unknown quantization spec {spec!r}: expected method 'weight-only' with 'bits'")
    unknown = set(spec) - {"method", "group_size", "bits", "linear_bits"}
    if unknown:
        raise CheckpointError(f"quantization spec has unknown keys {sorted(unknown)}")
    layers = dict(_moe_layers(model))
    got = {int(k): v for k, v in spec["bits"].items() if str(k).isdigit()}
    if set(got) != set(layers) or len(got) != len(spec["bits"]):
        raise CheckpointError(
            f"quantization spec names layers {sorted(spec['bits'])} but the MoE layers are {sorted(layers)}"
        )
    for i, bits in got.items():
        if not isinstance(bits, list) or len(bits) != layers[i].config.num_experts:
            raise CheckpointError(f"quantization spec: layer {i} needs one bit width per expert")
        for b in bits:
            check_spec(b, spec.get("group_size", 32))
    return got


def quantized_linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every linear a ``linear_bits`` spec quantises: standard attention's q/k/v/o
    projections and the untied output head (MLA reads its projections' weights directly: left float)."""
    found: list[tuple[torch.nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, Attention):
            found += [(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not model.config.tie_word_embeddings:  # type: ignore[union-attr]
        found.append((model, "lm_head"))
    return found


def quantize_linears(model: torch.nn.Module, spec: dict[str, Any], on_meta: bool = False) -> None:
    """Replace the linears of a ``linear_bits`` spec (none without one) by :class:`QuantLinear`: quantised
    from the float weights, or empty placeholders (``on_meta``) for a quantised checkpoint to be loaded into."""
    bits = spec.get("linear_bits")
    if bits is None:
        return
    group = spec.get("group_size", 32)
    for parent, name in quantized_linears(model):
        old = getattr(parent, name)
        if isinstance(old, QuantLinear):
            continue
        check_spec(bits, group, old.in_features)
        if on_meta:
            with torch.device("meta"):
                new = QuantLinear(old.in_features, old.out_features, bits, group, bias=old.bias is not None)
        else:
            with torch.no_grad():
                new = QuantLinear.from_linear(old, bits, group)
        setattr(parent, name, new)


def apply_spec(model: torch.nn.Module, spec: dict[str, Any], linears: bool = True) -> None:
    """Replace each MoE layer's experts by empty :class:`QuantizedExperts` of ``spec`` (on the experts'
    device, e.g. meta, before loading a quantised checkpoint into the model), and the spec's linears by
    empty :class:`QuantLinear` unless ``linears`` is False (a float checkpoint's, quantised after loading)."""
    if linears:
        quantize_linears(model, spec, on_meta=True)
    group = spec.get("group_size", 32)
    for i, bits in _layer_bits(spec, model).items():
        layer = dict(_moe_layers(model))[i]
        old = layer.experts
        device = next(old.parameters()).device
        with torch.device(device):
            layer.experts = QuantizedExperts(
                old.num_experts, old.hidden_size, old.expert_hidden_size, old.activation, bits, group
            )


@torch.no_grad()
def quantize_model(model: torch.nn.Module, spec: dict[str, Any], release=None) -> None:
    """Quantise a float model's experts in place, layer by layer (``release(experts)`` after each layer, e.g.
    to drop a mapped file's pages)."""
    group = spec.get("group_size", 32)
    for i, bits in _layer_bits(spec, model).items():
        layer = dict(_moe_layers(model))[i]
        old = layer.experts
        layer.experts = QuantizedExperts.from_experts(old, bits, group)
        if release is not None:
            release(old)
    quantize_linears(model, spec)


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of every MoE layer's expert weights (and scales) as the model holds them now."""
    total = 0
    for _, layer in _moe_layers(model):
        experts = layer.experts
        if isinstance(experts, QuantizedExperts):
            total += experts.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in experts.parameters())
    return total
