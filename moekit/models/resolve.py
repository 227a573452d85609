"""Model-config resolution in one spelling: every model's MoE knobs are its nested ``moe`` (``--model.moe.X``)."""

from __future__ import annotations

from typing import Any

from moekit.config import Config, require, unknown_key_error
from moekit.errors import ConfigError
from moekit.nn.config import MoEConfig

# Task models' MoE: top-1 of 8, the top-1 weight left unnormalised (renormalised it is always 1 and the router
# learns nothing from the task loss; Switch scales by the gate).
TASK_MOE_DEFAULTS: dict[str, Any] = dict(num_experts=8, top_k=1, expert_choice_capacity=1.0, norm_topk_prob=None)
# MoE fields old task runs saved flat in their model config, before ``moe`` was nested.
_FLAT_MOE = (*TASK_MOE_DEFAULTS, "router", "capacity_factor", "aux_loss_coef")


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A saved model-config dict in today's spelling: old task runs' flat MoE fields move into ``moe``, and an
    old ``moe.hidden_size`` (now the parent's) is dropped when it equals the model's ``hidden_size``."""
    data, moe = dict(data), data.get("moe")
    if flat := {k: data.pop(k) for k in _FLAT_MOE if k in data}:
        data["moe"] = {**flat, **(moe or {})}
    elif isinstance(moe, dict) and "hidden_size" in moe:
        data["moe"] = {k: v for k, v in moe.items() if k != "hidden_size"}
        old, hidden = moe["hidden_size"], data.get("hidden_size")
        require(old == hidden, f"moe.hidden_size={old} differs from the model's hidden_size={hidden}")
    return data


def equal_active_moe(moe: MoEConfig | dict[str, Any] | None, intermediate_size: int) -> MoEConfig:
    """A task model's MoEConfig from partial settings over :data:`TASK_MOE_DEFAULTS`; an unset ``expert_hidden_size``
    is ``intermediate_size // top_k``, so an MoE token runs the FLOPs of the dense baseline's."""
    if isinstance(moe, MoEConfig):
        return moe
    fields = {**TASK_MOE_DEFAULTS, **(moe or {})}
    if "expert_hidden_size" not in fields:
        k = fields["top_k"]
        ok = isinstance(k, int) and k >= 1 and intermediate_size % k == 0
        require(ok, f"intermediate_size={intermediate_size} is not a multiple of moe.top_k={k}")
        fields["expert_hidden_size"] = intermediate_size // k
    return MoEConfig.from_dict(fields)


def complete_task_dict(data: dict[str, Any], default_intermediate_size: int) -> dict[str, Any]:
    """A task model's config dict (saved, or from ``--model.*``) with ``moe`` completed by :func:`equal_active_moe`."""
    data = upgrade_saved(data)
    return {**data, "moe": equal_active_moe(data.get("moe"), data.get("intermediate_size", default_intermediate_size))}


def check_overrides(overrides: dict[str, Any], config_cls: type[Config], fixed: frozenset[str] = frozenset()) -> None:
    """Raise ConfigError for a ``--model.*`` key ``config_cls`` lacks; MoE knobs given flat point to ``model.moe.X``."""
    names, moe_names = config_cls.field_names() - fixed, MoEConfig.field_names()
    for key in overrides:
        if key in moe_names and key not in names:
            raise ConfigError(f"unknown model key {key!r}: MoE settings are nested, use model.moe.{key}")
        if key not in names:
            raise unknown_key_error(key, names, f"{config_cls.__name__} (--model.*)")
    moe = overrides.get("moe")
    require(moe is None or isinstance(moe, dict), f"model.moe={moe!r}: give null (dense) or model.moe.X settings")
    for key in moe or {}:
        if key not in moe_names:
            raise unknown_key_error(key, moe_names, "MoEConfig (--model.moe.*)")
