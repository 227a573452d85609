"""Model-config resolution: defaults or a preset, plus ``--model.*`` overrides, in one spelling.

The MoE knobs of every model live in its nested ``moe`` (:class:`MoEConfig`): ``--model.moe.num_experts``
for a language model, a classifier and a translator alike.
"""

from __future__ import annotations

from typing import Any

from moekit.config import Config, require, unknown_key_error
from moekit.errors import ConfigError
from moekit.nn.config import MoEConfig

# The task models' MoE defaults (V-MoE-style top-1 of 8; top-1 weight unnormalised, as Switch).
TASK_MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 8,
    "top_k": 1,
    "expert_choice_capacity": 1.0,
    "norm_topk_prob": None,
}
# MoE fields that task run folders saved flat in the model config, before ``moe`` was nested.
_FLAT_MOE_FIELDS = ("num_experts", "top_k", "router", "capacity_factor", "expert_choice_capacity", "aux_loss_coef")


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A saved model-config dict in today's spelling: flat MoE fields (old task runs) move into ``moe``,
    and ``moe.hidden_size`` (old runs; now the parent's) is dropped when it equals the model's."""
    data = dict(data)
    flat = {k: data.pop(k) for k in (*_FLAT_MOE_FIELDS, "norm_topk_prob") if k in data}
    moe = data.get("moe")
    if flat:
        data["moe"] = {**flat, **(moe or {})}
    elif isinstance(moe, dict) and "hidden_size" in moe:
        moe = dict(moe)
        saved = moe.pop("hidden_size")
        if saved != data.get("hidden_size"):
            raise ConfigError(f"moe.hidden_size={saved} differs from the model's hidden_size={data.get('hidden_size')}")
        data["moe"] = moe
    return data


def equal_active_moe(moe: MoEConfig | dict[str, Any] | None, intermediate_size: int) -> MoEConfig:
    """A task model's MoEConfig from its (partial) settings: :data:`TASK_MOE_DEFAULTS` fill the gaps, and an
    unset ``expert_hidden_size`` is ``intermediate_size // top_k`` (an MoE token runs as many FLOPs as a dense one)."""
    if isinstance(moe, MoEConfig):
        return moe
    fields = {**TASK_MOE_DEFAULTS, **(moe or {})}
    if "expert_hidden_size" not in fields:
        top_k = fields["top_k"]
        require(
            isinstance(top_k, int) and top_k >= 1 and intermediate_size % top_k == 0,
            f"intermediate_size={intermediate_size} must be a multiple of moe.top_k={top_k} "
            "(or set moe.expert_hidden_size)",
        )
        fields["expert_hidden_size"] = intermediate_size // top_k
    return MoEConfig.from_dict(fields)


def complete_task_dict(data: dict[str, Any], default_intermediate_size: int) -> dict[str, Any]:
    """A task model's config dict (saved, or from ``--model.*``) with ``moe`` completed by :func:`equal_active_moe`."""
    data = upgrade_saved(data)
    intermediate_size = data.get("intermediate_size", default_intermediate_size)
    return {**data, "moe": equal_active_moe(data.get("moe"), intermediate_size)}


def check_overrides(overrides: dict[str, Any], config_cls: type[Config], fixed: frozenset[str] = frozenset()) -> None:
    """Raise ConfigError for a ``--model.*`` key ``config_cls`` lacks; MoE knobs given flat point to ``model.moe.X``."""
    names = config_cls.field_names() - fixed
    for key in overrides:
        if key in names:
            continue
        if key in MoEConfig.field_names():
            raise ConfigError(f"unknown model key {key!r}: MoE settings are nested, use model.moe.{key}")
        raise unknown_key_error(key, names, f"{config_cls.__name__} (--model.*)")
    for key in overrides.get("moe") or {}:
        if key not in MoEConfig.field_names():
            raise unknown_key_error(key, MoEConfig.field_names(), "MoEConfig (--model.moe.*)")


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """``base`` (defaults or a preset's dict) with ``overrides`` applied; ``moe`` merges field by field, and
    ``moe: null`` asks for the dense baseline."""
    merged = {**base, **overrides}
    if "moe" in overrides and overrides["moe"] is not None:
        if "moe" in base and base["moe"] is None:
            raise ConfigError(f"model.moe overrides given, but {where} is dense")
        merged["moe"] = {**(base.get("moe") or {}), **overrides["moe"]}
    return merged
