"""Expert pruning: drop the least important experts of every MoE layer, judged on calibration data.

Per layer, experts are ranked by a :class:`~moekit.recipes.calibration.Criterion` (``frequency``: how
many assignments an expert got; ``router-weighted-output``: the summed ``w * ||f_e(x)||`` it added to
the layer output) and the top N are kept, in their original order. Their rows of ``experts.w_in``,
``experts.w_out``, ``router.weight`` (and ``router.bias``, ``router.e_score_correction_bias``) are
sliced out; every other tensor is copied. Layers may end with different expert counts: the new
model's :class:`~moekit.models.LMConfig` records them in ``moe_layer_overrides``, so it saves,
loads (``moekit.load``) and trains like any other checkpoint. When every layer ends alike, the change is
folded into ``moe`` itself (no overrides), so a uniformly pruned model also exports to Hugging Face.

Routing after pruning: a softmax router renormalises over the experts left, so pruning experts that
no token chose leaves the outputs unchanged when ``norm_topk_prob`` (the default) is set; ``top_k``
is capped at the experts kept (then every token uses all of them); group-limited sigmoid routing
(``n_group > 1``) is switched off because the groups no longer line up. Each change is reported in
``notes``. Expert-choice routing sizes each expert's capacity by the expert count and dense routing weighs
every expert, so for those two even unused experts leave a (small) trace when removed. Hash routing maps
token ids to expert numbers and cannot be pruned.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint import load_model, read_trainer_state, resolve_checkpoint, save_checkpoint
from moekit.config import check_choice
from moekit.errors import CheckpointError, ConfigError
from moekit.io.safe_io import atomic_write_json
from moekit.models import MoELM
from moekit.nn.config import RouterType
from moekit.recipes.calibration import Criterion, LayerStats, calibration_batches, collect_expert_stats

logger = logging.getLogger(__name__)

# Tensors of an MoE layer with one row per expert (names relative to ``layers.N.mlp.``).
EXPERT_TENSORS = ("experts.w_in", "experts.w_out", "router.weight", "router.bias", "router.e_score_correction_bias")


def check_compressible(model: MoELM, what: str) -> None:
    """Raise a ConfigError unless every MoE layer of ``model`` can lose experts."""
    layers = model.moe_layers()
    if not layers:
        raise ConfigError(f"the checkpoint is a dense model (no MoE layers): there are no experts to {what}")
    for i, moe in layers:
        if moe.config.router == RouterType.HASH:
            raise ConfigError(
                f"layer {i} uses router='hash' (a fixed token -> expert map): its experts cannot be {what}d"
            )
        if moe.config.num_zero_computation or moe.config.gating_residual:  # router rows beyond the FFN experts
            raise ConfigError(f"layer {i} has MoE++ zero-computation experts or a gating residual: cannot {what} it")


def rebuild_with_experts(
    model: MoELM, layer_tensors: Mapping[int, Mapping[str, torch.Tensor]], notes: list[str] | None = None
) -> MoELM:
    """A copy of ``model`` (same mode and dtype) whose listed MoE layers get new per-expert tensors, and so new
    expert counts: ``layer_tensors`` maps a layer to {name in :data:`EXPERT_TENSORS`: tensor with E' rows}, one
    for every per-expert tensor the layer has. What changed in routing (top_k capped, grouping off) is
    appended to ``notes``."""
    cfg = model.config
    notes = notes if notes is not None else []
    overrides = {k: dict(v) for k, v in (cfg.moe_layer_overrides or {}).items()}
    base = cfg.moe.to_dict()
    state = dict(model.state_dict())
    for layer, tensors in layer_tensors.items():
        moe_cfg = cfg.moe_config(layer)
        if moe_cfg is None:
            raise ConfigError(f"layer {layer} is not an MoE layer")
        E = int(tensors["experts.w_in"].shape[0])
        if E < 1:
            raise ConfigError(f"layer {layer} would keep no experts")
        fields = {**overrides.get(layer, {}), "num_experts": E}
        if moe_cfg.router in (RouterType.SOFTMAX_TOPK, RouterType.SIGMOID_TOPK) and moe_cfg.top_k > E:
            fields["top_k"] = E
            notes.append(f"layer {layer}: top_k {moe_cfg.top_k} -> {E} (capped at the {E} experts left)")
        if moe_cfg.n_group > 1:
            fields["n_group"], fields["topk_group"] = 1, 1
            notes.append(f"layer {layer}: group-limited routing (n_group={moe_cfg.n_group}) switched off")
        overrides[layer] = {k: v for k, v in fields.items() if base.get(k) != v}
        prefix = f"layers.{layer}.mlp."
        for name in EXPERT_TENSORS:
            key = prefix + name
            if key in state:
                if name not in tensors:
                    raise ConfigError(f"layer {layer}: no new {name!r} given")
                if tensors[name].shape[0] != E:
                    raise ConfigError(f"layer {layer}: {name} has {tensors[name].shape[0]} rows, expected {E}")
                state[key] = tensors[name]
    new_cfg = _fold_uniform(cfg.replace(moe_layer_overrides={k: v for k, v in overrides.items() if v} or None))
    param = next(model.parameters())
    new = MoELM(new_cfg).to(device=param.device, dtype=param.dtype)
    new.load_state_dict(state, strict=True)
    return new.train(model.training)


def _fold_uniform(cfg):
    """When every MoE layer ends with the same MoEConfig, make it the model's ``moe`` (no per-layer overrides):
    a uniformly pruned model then has a plain config that exporters (e.g. to Hugging Face) understand."""
    if not cfg.moe_layer_overrides:
        return cfg
    configs = {cfg.moe_config(i) for i in cfg.sparse_layers}
    if len(configs) == 1:
        return cfg.replace(moe=configs.pop(), moe_layer_overrides=None)
    return cfg


def _keep_count(E: int, layer: int, keep: int | None, keep_fraction: float | None) -> int:
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep={keep!r} must be a positive number of experts")
        if keep > E:
            raise ConfigError(f"keep={keep} exceeds the {E} experts of layer {layer}")
        return keep
    n = math.floor(keep_fraction * E + 0.5)
    if n < 1:
        raise ConfigError(f"keep_fraction={keep_fraction} keeps 0 of the {E} experts of layer {layer}")
    return n


def select_experts(
    stats: Mapping[int, LayerStats],
    keep: int | None = None,
    keep_fraction: float | None = None,
    criterion: Criterion | str = Criterion.FREQUENCY,
) -> dict[int, list[int]]:
    """Layer -> the expert indices to keep, ascending: the top ``keep`` per layer (or the share ``keep_fraction``
    in (0, 1], rounded to the nearest count) by ``criterion`` (ties: more assignments, then lower index)."""
    criterion = check_choice("criterion", criterion, Criterion)
    if (keep is None) == (keep_fraction is None):
        raise ConfigError("give exactly one of keep (experts per layer) and keep_fraction")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ConfigError(f"keep_fraction={keep_fraction} must be in (0, 1]")
    kept = {}
    for layer, s in stats.items():
        n = _keep_count(s.num_experts, layer, keep, keep_fraction)
        score, freq = s.score(criterion).tolist(), s.frequency.tolist()
        order = sorted(range(s.num_experts), key=lambda e: (-score[e], -freq[e], e))
        kept[layer] = sorted(order[:n])
    return kept


def prune_experts(model: MoELM, keep: Mapping[int, Sequence[int]], notes: list[str] | None = None) -> MoELM:
    """A copy of ``model`` that keeps only the listed experts of each listed MoE layer (in the given order)."""
    check_compressible(model, "prune")
    moes = dict(model.moe_layers())
    layer_tensors = {}
    for layer, experts in keep.items():
        if layer not in moes:
            raise ConfigError(f"layer {layer} is not an MoE layer {sorted(moes)}")
        E = moes[layer].config.num_experts
        bad = [e for e in experts if not 0 <= e < E]
        if bad or len(set(experts)) != len(experts) or not experts:
            raise ConfigError(f"layer {layer}: cannot keep experts {list(experts)} of {E}")
        idx = torch.tensor(list(experts), dtype=torch.long)
        prefix = f"layers.{layer}.mlp."
        state = model.state_dict()
        layer_tensors[layer] = {
            name: state[prefix + name].index_select(0, idx.to(state[prefix + name].device)).clone()
            for name in EXPERT_TENSORS
            if prefix + name in state
        }
    return rebuild_with_experts(model, layer_tensors, notes)


def prune(
    model: MoELM,
    stats: Mapping[int, LayerStats],
    keep: int | None = None,
    keep_fraction: float | None = None,
    criterion: Criterion | str = Criterion.FREQUENCY,
) -> tuple[MoELM, dict[str, Any]]:
    """Rank experts by ``criterion`` on ``stats`` and keep the top ``keep`` (or ``keep_fraction``) per layer;
    returns the pruned model and a JSON-friendly report (kept experts, scores and routing notes per layer)."""
    criterion = check_choice("criterion", criterion, Criterion)
    kept = select_experts(stats, keep, keep_fraction, criterion)
    notes: list[str] = []
    pruned = prune_experts(model, kept, notes)
    for note in notes:
        logger.warning(note)
    report = {
        "method": "prune",
        "criterion": criterion.value,
        "keep": keep,
        "keep_fraction": keep_fraction,
        "layers": {
            str(layer): {
                "kept": kept[layer],
                "score": [round(v, 6) for v in stats[layer].score(criterion).tolist()],
                **stats[layer].to_dict(),
            }
            for layer in kept
        },
        "notes": notes,
        "parameters": {"before": model.num_parameters(), "after": pruned.num_parameters()},
    }
    return pruned, report


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as a Path; CheckpointError if it already holds a checkpoint (nothing is overwritten)."""
    out = Path(out)
    if (out / "checkpoints").exists() or (out / "config.json").exists():
        raise CheckpointError(f"{out} already holds a checkpoint; choose another --out")
    return out


def save_compressed(out: str | os.PathLike, model: MoELM, tokenizer, report: dict[str, Any], source) -> Path:
    """Write a compressed model as a moekit checkpoint under ``out`` (``out/checkpoints/step-...``) plus
    ``out/compression.json``; refuses a folder that already holds a checkpoint."""
    out = check_out_dir(out)
    try:
        step = int(read_trainer_state(source).get("step", 0))
    except CheckpointError:
        step = 0
    path = save_checkpoint(out, step, model, tokenizer, trainer_state={"compressed_from": str(source)})
    atomic_write_json(out / "compression.json", {"source": str(source), **report})
    return path


def load_for_compression(checkpoint, what: str):
    """(model, tokenizer, resolved checkpoint folder), checked to have experts to ``what``."""
    source = resolve_checkpoint(checkpoint)
    model, tokenizer = load_model(source)
    check_compressible(model, what)
    return model, tokenizer, source


def prune_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    keep: int | None = None,
    keep_fraction: float | None = None,
    criterion: Criterion | str = Criterion.FREQUENCY,
    calibration_data: str | os.PathLike | torch.Tensor | None = None,
    block_size: int = 128,
    batch_size: int = 16,
    max_batches: int | None = 8,
) -> dict[str, Any]:
    """The function behind ``moekit prune``: load, calibrate, prune, save to ``out``; returns the report (also in
    ``out/compression.json``) with ``checkpoint`` set to the new folder."""
    criterion = check_choice("criterion", criterion, Criterion)
    if calibration_data is None:
        raise ConfigError("pruning needs calibration data (a text file the experts are ranked on)")
    check_out_dir(out)
    model, tokenizer, source = load_for_compression(checkpoint, "prune")
    # Fail on bad counts before the calibration pass.
    select_experts(
        {i: LayerStats(layer=i, num_experts=m.config.num_experts) for i, m in model.moe_layers()}, keep, keep_fraction
    )
    block = min(block_size, model.config.max_position_embeddings)
    batches = calibration_batches(tokenizer, calibration_data, block, batch_size, max_batches, model.config.vocab_size)
    stats = collect_expert_stats(model, batches)
    pruned, report = prune(model, stats, keep, keep_fraction, criterion)
    path = save_compressed(out, pruned, tokenizer, report, source)
    return {**report, "checkpoint": str(path)}


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    for layer, info in report["layers"].items():
        if "kept" in info:
            lines.append(f"layer {layer}: kept experts {info['kept']} of {info['num_experts']}")
        else:
            lines.append(f"layer {layer}: {info['num_experts']} experts -> clusters {info['clusters']}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    p = report["parameters"]
    lines.append(
        f"parameters: {p['before']['total']:,} -> {p['after']['total']:,} total, "
        f"{p['before']['active']:,} -> {p['after']['active']:,} active"
    )
    return "\n".join(lines)
