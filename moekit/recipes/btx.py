"""Branch-Train-MiX (Sukhbaatar et al. 2024) as one pipeline, each stage also callable alone.

1. branch: fine-tune copies of one seed dense model, one per domain corpus;
2. mix: the domains' FFNs become the experts of one MoE; attention, embeddings, norms averaged;
3. router: train only the routers on the union of the domains;
4. finetune (optional): train everything on the union.

Stage outputs live in ``out/``: ``branch-<domain>/``, ``mixed/``, ``router/``, ``finetune/``, each a
run folder that ``moekit.load`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moekit.checkpoint import load_model, save_checkpoint
from moekit.errors import ConfigError
from moekit.interop.hf.api import is_hf_checkpoint, load_hf_for_training
from moekit.recipes.upcycle import mix_experts
from moekit.train.trainer import train

STAGES = ("branch", "mix", "router", "finetune")


def load_dense(path: str | os.PathLike):
    """(model, tokenizer) from a moekit checkpoint/run folder or a Hugging Face folder."""
    return load_hf_for_training(path) if is_hf_checkpoint(path) else load_model(path)


def branch(seed: str, domains: dict[str, str], out: Path, steps: int, **train_options: Any) -> dict[str, Path]:
    """Fine-tune one copy of ``seed`` per domain; returns domain -> run folder."""
    runs = {}
    for name, data in domains.items():
        run = out / f"branch-{name}"
        train(init_from=str(seed), data=str(data), max_steps=steps, out_dir=str(run), **train_options)
        runs[name] = run
    return runs


def mix(experts: list[str | os.PathLike], out: Path, top_k: int = 2, seed: int = 0) -> Path:
    """Build the MoE from the dense expert models and save it as ``out/mixed``."""
    loaded = [load_dense(path) for path in experts]
    vocab = {tok.vocab_size for _, tok in loaded}
    if len(vocab) > 1:
        raise ConfigError(f"the models' tokenizers differ in vocabulary size ({sorted(vocab)}); they cannot be mixed")
    model = mix_experts([m for m, _ in loaded], top_k=top_k, seed=seed)
    target = out / "mixed"
    save_checkpoint(target, 0, model, loaded[0][1])
    return target


def branch_train_mix(
    out: str | os.PathLike,
    seed: str | None = None,
    domains: dict[str, str] | None = None,
    experts: list[str] | None = None,
    stages: tuple[str, ...] = STAGES,
    branch_steps: int = 200,
    router_steps: int = 100,
    finetune_steps: int = 0,
    top_k: int = 2,
    **train_options: Any,
) -> dict[str, Path]:
    """Run the BTX ``stages`` in order into ``out``; returns stage -> output folder. ``branch`` fine-tunes ``seed``
    on each of the ``domains`` (name -> corpus; their union feeds ``router`` and ``finetune``); ``experts`` are
    already fine-tuned dense models to mix instead; ``train_options`` are TrainConfig fields for every stage."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown BTX stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Path] = {}
    if "branch" in stages:
        if not seed or not domains:
            raise ConfigError("the branch stage needs --seed and at least two --domain NAME=PATH")
        runs = branch(seed, domains, out, branch_steps, **train_options)
        experts = [str(run) for run in runs.values()]
        results.update({f"branch-{k}": v for k, v in runs.items()})
    if "mix" in stages:
        if not experts:
            experts = sorted(str(p) for p in out.glob("branch-*"))
        if len(experts) < 2:
            raise ConfigError("the mix stage needs at least two dense models (--experts, or run the branch stage)")
        results["mix"] = mix(experts, out, top_k=top_k)
    union = tuple(str(p) for p in (domains or {}).values()) or None
    previous = out / "mixed"
    for stage, steps, trainable in (("router", router_steps, "router"), ("finetune", finetune_steps, None)):
        if stage in stages and steps > 0:
            if union is None:
                raise ConfigError(f"the {stage} stage needs the domain corpora (--domain NAME=PATH)")
            run = out / stage
            train(
                init_from=str(previous),
                data=union,
                max_steps=steps,
                trainable=trainable,
                out_dir=str(run),
                **train_options,
            )
            results[stage] = run
            previous = run
    return results
