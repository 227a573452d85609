"""Knowledge distillation: train a dense (or smaller MoE) student on a teacher's softened predictions.

Loss per micro-batch (Hinton et al. 2015; Switch Transformer sec. 5, Fedus et al. 2022)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, data)

KL and CE are means over the batch's token positions, in fp32. The T^2 keeps the soft term's gradient
scale independent of T. Switch's best recipe is alpha = 0.25 with the student's non-expert weights
copied from the teacher (``init_from_teacher``).

Top-k teacher logits (``top_k_logits=K``): only the teacher's K largest logits per position are kept
(on the fly, or in the cache). The teacher distribution is renormalised over those K tokens,
``p_k = softmax(teacher_topk / T)``; the student keeps its full-vocabulary softmax, read at the same K
ids: ``KL_k = sum_k p_k (log p_k - log_softmax(student / T)[ids_k])``. This is >= 0, is zero only when
the student puts all its mass on the teacher's K tokens in the teacher's proportions, and equals the
full KL when K = V.

Teacher logits come on the fly (a no-grad forward of the teacher, in eval mode, per micro-batch) or
from a cache folder (``cache_teacher``, :mod:`moekit.recipes.teacher_cache`) that the teacher fills before
training with exactly the micro-batches the run will draw (the loader is deterministic in (seed, step)). A
later run with the same data, seed, batch and block size (and any student) reads it instead of running the
teacher; every cached batch's input ids are checked against the batch drawn.

The training loop is the language-model :class:`moekit.train.Trainer` with this loss as its task loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit.checkpoint import load_model, read_model_config, resolve_checkpoint
from moekit.config import Config, read_config_file, require
from moekit.data.tokenizers import Tokenizer, load_tokenizer
from moekit.errors import CheckpointError, ConfigError
from moekit.io.safe_io import atomic_write_json
from moekit.models import LMConfig, MoELM
from moekit.models.presets import PRESETS
from moekit.recipes.teacher_cache import TeacherCache
from moekit.train.config import TrainConfig
from moekit.train.loop import TrainResult
from moekit.train.trainer import Trainer

logger = logging.getLogger(__name__)

DISTILL_FILE = "distill.json"


# -- the loss ------------------------------------------------------------------------------------
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher / T) || softmax(student / T)), in fp32, from the teacher's full
    logits [..., V] or its ``teacher_topk`` (values [..., K], ids [..., K]), renormalised over those K."""
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    if teacher_topk is not None:
        values, ids = teacher_topk
        log_p_t = F.log_softmax(values.float() / T, dim=-1)
        log_p_s = log_p_s.gather(-1, ids.long())
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ: teacher and student must share a vocabulary"
            )
        log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean()


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``alpha * T^2 * KL + (1 - alpha) * CE(student, labels)`` (see the module docstring); ``labels`` [B, S] (or
    [N]) are next-token targets aligned with the logits [B, S, V] (no shift here)."""
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.float().reshape(-1, V), labels.reshape(-1))
    if alpha == 0:
        return ce
    kl = kd_loss(student_logits, teacher_logits, temperature, teacher_topk)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def top_k_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest logits along the last dim."""
    values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return values, ids


# -- configuration -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """The distillation knobs (the training ones are a :class:`TrainConfig`)."""

    teacher: str
    temperature: float = 2.0
    alpha: float = 0.5
    top_k_logits: int | None = None
    cache_teacher: str | None = None
    init_from_teacher: bool = False  # copy the teacher's non-expert weights where names and shapes match

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        require(
            self.top_k_logits is None or (isinstance(self.top_k_logits, int) and self.top_k_logits >= 1),
            f"top_k_logits must be a positive integer or None, got {self.top_k_logits!r}",
        )


# -- teachers ------------------------------------------------------------------------------------
def load_teacher(path: str | os.PathLike) -> tuple[MoELM, Tokenizer]:
    """A moekit checkpoint/run folder, or a Hugging Face model folder (in its own dtype)."""
    from moekit.interop.hf.api import from_hf, is_hf_checkpoint  # (interop's import cost only when needed)

    return (from_hf(path), load_tokenizer(Path(path))) if is_hf_checkpoint(path) else load_model(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def check_same_vocabulary(teacher: MoELM, teacher_tok: Tokenizer, student: MoELM, student_tok: Tokenizer) -> None:
    """ConfigError unless teacher and student have the same vocabulary size and tokenizer."""
    _check_vocab_sizes(teacher.config.vocab_size, student.config.vocab_size)
    if teacher_tok.to_dict() != student_tok.to_dict():
        raise ConfigError(
            f"teacher and student use different tokenizers ({teacher_tok!r} vs {student_tok!r}); "
            "distillation needs the same token ids"
        )


def _check_vocab_sizes(teacher: int, student: int) -> None:
    if teacher != student:
        raise ConfigError(
            f"teacher and student have different vocabularies: teacher vocab_size={teacher}, student vocab_size="
            f"{student}; distillation compares their next-token distributions token by token"
        )


def copy_non_expert_weights(teacher: MoELM, student: MoELM) -> list[str]:
    """Copy every teacher tensor outside its MoE layers into the student where name and shape match; returns the
    names copied."""
    moe_prefixes = tuple(f"layers.{i}.mlp." for i, _ in teacher.moe_layers())
    t_state = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            src = t_state.get(name)
            if src is None or name.startswith(moe_prefixes) or src.shape != tensor.shape:
                continue
            tensor.copy_(src)
            copied.append(name)
    return copied


# -- the trainer -----------------------------------------------------------------------------------
class DistillTrainer(Trainer):
    """The language-model :class:`Trainer` of the student (``config``) with :func:`distillation_loss` against
    ``teacher`` (put in eval mode, gradients off; its tokenizer must equal the student's) as its task loss."""

    def __init__(
        self,
        config: TrainConfig,
        teacher: MoELM,
        teacher_tokenizer: Tokenizer,
        distill: DistillConfig,
        resume: bool = False,
        console=None,
    ):
        super().__init__(config, resume=resume, console=console)
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.distill = distill
        check_same_vocabulary(teacher, teacher_tokenizer, self.model, self.tokenizer)
        if distill.init_from_teacher and not resume:
            copied = copy_non_expert_weights(teacher, self.model)
            logger.info("initialised %d student tensors from the teacher", len(copied))
        self.cache = None
        if distill.cache_teacher:
            steps = config.max_steps * config.grad_accum
            key = {
                "teacher": str(distill.teacher),
                "top_k": distill.top_k_logits,
                "vocab_size": teacher.config.vocab_size,
                "precision": config.precision.value,
            }
            self.cache = TeacherCache.open_or_build(
                distill.cache_teacher, key, self.loader, self.teacher_targets, steps
            )
        self.task.compute_loss = self.distillation_loss

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor):
        """The teacher's logits for ``x`` (fp32), or their top-k (values, ids) with ``top_k_logits``."""
        self.teacher.eval()
        with self._autocast():
            logits = self.teacher(x).logits.float()
        if self.distill.top_k_logits is not None:
            return top_k_logits(logits, self.distill.top_k_logits)
        return logits

    def distillation_loss(self, x: torch.Tensor, y: torch.Tensor, out) -> torch.Tensor:
        """The task loss of one micro-batch: :func:`distillation_loss` against the teacher (cached or on the fly)."""
        d = self.distill
        if d.alpha == 0:  # plain cross-entropy: no teacher needed
            return distillation_loss(out.logits, y, alpha=0.0)
        targets = None
        if self.cache is not None:
            targets = self.cache.get(self.loader.step - 1, x)  # the loader has already moved past x
        if targets is None:
            targets = self.teacher_targets(x)
        full, topk = (None, targets) if isinstance(targets, tuple) else (targets, None)
        return distillation_loss(out.logits, y, full, d.temperature, d.alpha, topk)


# -- the function behind `moekit distill` ------------------------------------------------------------
def student_options(student: str | os.PathLike, teacher: MoELM, teacher_dir: Path) -> dict[str, Any]:
    """TrainConfig fields that make ``student``: a preset name, an LMConfig file, or a checkpoint folder."""
    p = Path(student)
    if str(student) in PRESETS and not p.exists():
        return {"model": str(student), "model.vocab_size": teacher.config.vocab_size, "tokenizer": str(teacher_dir)}
    if p.is_dir():
        return {"init_from": str(resolve_checkpoint(p))}
    if p.is_file():
        data = read_config_file(p)
        if data.get("format") == "moekit" and "model" in data:  # a checkpoint's config.json
            data = data["model"]
        config = LMConfig.from_dict(data).to_dict()  # validates, names unknown keys
        base = "dense-demo" if config.get("moe") is None else "demo"
        options = {f"model.{k}": v for k, v in config.items() if k != "moe"}
        options.update({f"model.moe.{k}": v for k, v in (config.get("moe") or {}).items()})
        return {"model": base, **options, "tokenizer": str(teacher_dir)}
    raise ConfigError(
        f"student={str(student)!r} is neither a preset ({', '.join(PRESETS)}), an LMConfig file, "
        "nor a checkpoint folder"
    )


def distill(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    temperature: float = 2.0,
    alpha: float = 0.5,
    top_k_logits: int | None = None,
    cache_teacher: str | os.PathLike | None = None,
    init_from_teacher: bool = False,
    config: TrainConfig | dict | None = None,
    resume: bool = False,
    console=None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` and return the student run's TrainResult; what ``moekit distill`` runs.

    ``teacher`` is a moekit checkpoint or run folder (or a Hugging Face model folder); ``student`` a preset name,
    an LMConfig file (YAML/JSON/TOML, or a checkpoint's config.json) or a checkpoint folder to start from. The
    distillation knobs are :class:`DistillConfig`'s; ``config`` (a TrainConfig or dict) and ``overrides`` set the
    training; ``resume`` continues the run in ``out_dir`` (with the same distillation settings).
    """
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    for key in ("model", "init_from"):
        if key in overrides or (key in base and not isinstance(config, TrainConfig)):
            raise ConfigError(f"distill makes the student from --student; do not set {key!r} too")
    teacher_model, teacher_tok = load_teacher(teacher)
    try:
        teacher_dir = resolve_checkpoint(teacher)
    except CheckpointError:
        teacher_dir = Path(teacher)
    dcfg = DistillConfig(
        teacher=str(teacher),
        temperature=temperature,
        alpha=alpha,
        top_k_logits=top_k_logits,
        cache_teacher=None if cache_teacher is None else str(cache_teacher),
        init_from_teacher=init_from_teacher,
    )
    made = student_options(student, teacher_model, teacher_dir)
    explicit = isinstance(config, TrainConfig) and config.tokenizer != TrainConfig().tokenizer
    if "tokenizer" in overrides or explicit or (not isinstance(config, TrainConfig) and "tokenizer" in base):
        made.pop("tokenizer", None)  # the user's tokenizer (checked against the teacher's below)
    cfg = TrainConfig.from_options({**base, **made, **overrides})
    # Fail before anything is built: the student's vocabulary is known from its config.
    if cfg.init_from:
        student_vocab = read_model_config(cfg.init_from).vocab_size
    else:
        student_vocab = cfg.model_overrides.get("vocab_size", PRESETS[cfg.model].vocab_size)
    _check_vocab_sizes(teacher_model.config.vocab_size, student_vocab)
    trainer = DistillTrainer(cfg, teacher_model, teacher_tok, dcfg, resume=resume, console=console)
    record = {k: v for k, v in dcfg.to_dict().items() if k != "cache_teacher"}
    distill_file = trainer.run_dir / DISTILL_FILE
    if resume and distill_file.is_file():
        stored = _read_json(distill_file)
        changed = [k for k in record if stored.get(k) != record[k]]
        if changed:
            raise CheckpointError(
                f"--resume with different distillation settings: {changed[0]} was {stored.get(changed[0])!r}, "
                f"now {record[changed[0]]!r}"
            )
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(distill_file, record)
    return trainer.run()
