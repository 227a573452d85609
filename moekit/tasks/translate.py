"""Translation with an MoE encoder-decoder (``moekit train --task translate``, ``moekit translate``).

Parallel files (moekit.data.parallel) -> a joint byte-level BPE learnt on the training sources and targets
(moekit.data.bpe) -> batches of similar-length pairs holding about ``batch_tokens`` tokens a side -> the
one training loop (:mod:`moekit.train.loop` with :class:`TranslateTask`), label-smoothed cross-entropy + the
MoE balancing loss -> validation loss every ``eval_interval`` steps and greedy BLEU (sacrebleu) at the end.
The run folder holds ``model.safetensors``, ``model.json`` (task, model config), ``tokenizer.json``,
``run.json``, ``metrics.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit import checkpoint as ckpt
from moekit.config import require
from moekit.data.bpe import BOS_ID, EOS_ID, PAD_ID, SubwordTokenizer
from moekit.data.parallel import BUILTIN_SOURCE, BUILTIN_TARGET, ParallelText, read_parallel
from moekit.errors import CheckpointError, ConfigError, DataError
from moekit.io.safe_io import atomic_write_json, load_tensors, save_tensors
from moekit.models.resolve import check_overrides
from moekit.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from moekit.tasks.batches import Batches
from moekit.tasks.decoding import corpus_bleu, translate
from moekit.tasks.examples import split_rows
from moekit.train.config import TaskTrainConfig
from moekit.train.loop import Loop, StepLoss, open_run
from moekit.train.metrics import load_imbalance

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "model.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TranslateConfig(TaskTrainConfig):
    """A translation run: data fields here, optimisation fields in :class:`TaskTrainConfig` (with defaults
    for translation); ``model_overrides`` sets :class:`Seq2SeqConfig` fields (``--model.moe.num_experts 4``).

    ``source``/``target`` None trains on the built-in English-German pairs. Without ``valid_source`` and
    ``valid_target`` the last ``valid_fraction`` of the (shuffled) training pairs are held out.
    Training pairs with either side longer than ``max_length`` tokens are left out.
    """

    task: str = "translate"
    source: str | None = None
    target: str | None = None
    valid_source: str | None = None
    valid_target: str | None = None
    valid_fraction: float = 0.05
    vocab_size: int = 8000
    max_length: int = 64
    batch_tokens: int = 2048
    bleu_sentences: int = 1000  # validation sentences translated (greedy) for the BLEU reported after training
    # TaskTrainConfig fields with translation's defaults
    max_steps: int = 1_000_000
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.01
    beta2: float = 0.98
    label_smoothing: float = 0.1
    eval_interval: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.task == "translate", f"task must be 'translate' here, got {self.task!r}")
        for name in ("batch_tokens", "max_length", "vocab_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        require(self.bleu_sentences >= 0, f"bleu_sentences must be >= 0, got {self.bleu_sentences}")
        require((self.source is None) == (self.target is None), "give both source and target files (or neither)")
        require(
            (self.valid_source is None) == (self.valid_target is None),
            "give both valid_source and valid_target files (or neither)",
        )
        require(0 < self.valid_fraction < 1, f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        check_overrides(self.model_overrides, Seq2SeqConfig, fixed=frozenset({"vocab_size"}))


# -- examples ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pairs:
    """Token ids of sentence pairs: sources end with EOS; targets are bare (BOS/EOS are added per batch)."""

    src: list[list[int]]
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)

    def num_tokens(self) -> int:
        return sum(len(s) for s in self.src) + sum(len(t) + 1 for t in self.tgt)

    def batch(self, rows: Sequence[int]):
        """(src ids [B, M], src mask, decoder input [B, S] = BOS + target, labels [B, S] = target + EOS, mask)."""
        src = [self.src[i] for i in rows]
        tgt = [self.tgt[i] for i in rows]
        B, M, S = len(rows), max(len(s) for s in src), max(len(t) for t in tgt) + 1
        src_ids = torch.full((B, M), PAD_ID, dtype=torch.long)
        tgt_in = torch.full((B, S), PAD_ID, dtype=torch.long)
        labels = torch.full((B, S), PAD_ID, dtype=torch.long)
        for i, (s, t) in enumerate(zip(src, tgt)):
            src_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            tgt_in[i, : len(t) + 1] = torch.tensor([BOS_ID, *t], dtype=torch.long)
            labels[i, : len(t) + 1] = torch.tensor([*t, EOS_ID], dtype=torch.long)
        src_mask = src_ids != PAD_ID
        src_mask[:, 0] = True  # an (impossible) empty source still has one key to attend to
        return src_ids, src_mask, tgt_in, labels, labels != PAD_ID

    def batches(self, batch_tokens: int, generator: torch.Generator | None = None) -> list[list[int]]:
        """Row lists of similar-length pairs, each padded to at most ``batch_tokens`` tokens a side.

        With a generator, equal lengths are shuffled and the batches come in random order (a new
        grouping every epoch); without one, in length order (evaluation).
        """
        length = torch.tensor([max(len(s), len(t) + 1) for s, t in zip(self.src, self.tgt)], dtype=torch.float)
        if generator is not None:
            length = length + torch.rand(len(length), generator=generator)
        order = torch.argsort(length, stable=True).tolist()
        out, current, widest = [], [], 0
        for i in order:
            width = max(len(self.src[i]), len(self.tgt[i]) + 1)
            if current and max(widest, width) * (len(current) + 1) > batch_tokens:
                out.append(current)
                current, widest = [], 0
            current.append(i)
            widest = max(widest, width)
        if current:
            out.append(current)
        if generator is not None:
            out = [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]
        return out


def encode_pairs(tokenizer: SubwordTokenizer, data: ParallelText, max_length: int | None = None) -> Pairs:
    """Tokenize both sides; with ``max_length``, pairs with a side longer than it (with EOS) are left out."""
    src = [ids + [EOS_ID] for ids in tokenizer.encode_batch(data.sources)]
    tgt = tokenizer.encode_batch(data.targets)
    if max_length is None:
        return Pairs(src, tgt)
    keep = [i for i in range(len(src)) if len(src[i]) <= max_length and len(tgt[i]) + 1 <= max_length]
    if len(keep) < len(src):
        log.warning(
            "%s: left out %d of %d pairs longer than max_length=%d tokens",
            data.source_path,
            len(src) - len(keep),
            len(src),
            max_length,
        )
    if not keep:
        raise DataError(f"{data.source_path}: every pair is longer than max_length={max_length} tokens")
    return Pairs([src[i] for i in keep], [tgt[i] for i in keep])


def load_task_data(cfg: TranslateConfig) -> tuple[ParallelText, ParallelText]:
    """(train pairs, validation pairs) as read from the files (or the built-in set), before tokenizing."""
    train = read_parallel(cfg.source or BUILTIN_SOURCE, cfg.target or BUILTIN_TARGET)
    if cfg.valid_source is not None:
        return train, read_parallel(cfg.valid_source, cfg.valid_target)
    if len(train) < 2:
        raise DataError(f"{train.source_path}: needs at least 2 pairs to hold some out for validation")
    train_rows, valid_rows = split_rows(len(train), cfg.valid_fraction, cfg.seed)
    return train.subset(train_rows), train.subset(valid_rows)


# -- the run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class TranslateResult:
    run_dir: Path
    step: int
    valid_loss: float  # token cross-entropy on the validation pairs (no label smoothing), after the last step
    bleu: float | None  # greedy BLEU on the first ``bleu_sentences`` validation pairs (None when 0)
    history: list[dict[str, float]]  # one record per evaluation
    parameters: int
    active_parameters: int
    seconds: float  # training time (the final BLEU is not counted)
    tokens_per_second: float  # source + target tokens trained on per second


class TranslateTask:
    """Translation as a task of the one loop: batches of similar-length pairs, label-smoothed cross-entropy,
    validation loss and expert loads; the run folder's model files are rewritten with each checkpoint."""

    def __init__(self, cfg: TranslateConfig, model: Seq2SeqTransformer, tokenizer, train_set: Pairs, valid_set: Pairs):
        self.cfg, self.model, self.tokenizer, self.train_set, self.valid_set = (
            cfg,
            model,
            tokenizer,
            train_set,
            valid_set,
        )
        self.batches = Batches(_shuffled_batches(train_set, cfg.batch_tokens, cfg.seed))
        self.state_dict, self.load_state_dict = self.batches.state_dict, self.batches.load_state_dict

    def next_batch(self):
        return self.train_set.batch(self.batches.next())

    def loss(self, batch) -> StepLoss:
        src, src_mask, tgt_in, labels, tgt_mask = batch
        out = self.model(src, tgt_in, src_mask, tgt_mask, logits_mask=tgt_mask)
        loss = F.cross_entropy(out.logits.float(), labels[tgt_mask], label_smoothing=self.cfg.label_smoothing)
        return StepLoss(loss, out.aux_loss, out.moe_aux, int(src_mask.sum()) + int(tgt_mask.sum()))

    def evaluate(self, step: int) -> dict[str, Any]:
        valid_loss, loads = validation_loss(self.model, self.valid_set, self.cfg.batch_tokens)
        return {"valid_loss": valid_loss, "valid_layer_imbalance": [load_imbalance(a) for a in loads]}

    def summary(self, record: dict[str, Any]) -> str:
        return f"valid loss {record['valid_loss']:.4f}"

    def describe(self) -> dict[str, Any]:
        return _meta(self.model)

    def start(self, run_dir: Path) -> None:
        pass

    def export(self, run_dir: Path) -> None:
        save_translator(run_dir, self.model, self.tokenizer)


def translate_loop(cfg: TranslateConfig, resume: bool = False, console=None) -> tuple[Loop, ParallelText]:
    """The training loop of a translator in ``cfg.out_dir``, and the validation pairs."""
    run_dir = Path(cfg.out_dir or f"runs/translate-{time.strftime('%Y%m%d-%H%M%S')}")
    source = open_run(run_dir, resume)
    train_data, valid_data = load_task_data(cfg)
    if resume:  # the run's own subwords, not a new tokenizer learnt from the data given now
        tokenizer = SubwordTokenizer.load(run_dir)
    else:
        tokenizer = SubwordTokenizer.train([*train_data.sources, *train_data.targets], cfg.vocab_size)
    train_set = encode_pairs(tokenizer, train_data, cfg.max_length)
    valid_set = encode_pairs(tokenizer, valid_data)
    torch.manual_seed(cfg.seed)
    fields = {"vocab_size": tokenizer.vocab_size, "max_length": cfg.max_length, **cfg.model_overrides}
    model = Seq2SeqTransformer(Seq2SeqConfig.from_dict(fields))
    if source is not None:
        ckpt.check_same_description(run_dir / META, _meta(model), _upgrade_meta)
        ckpt.load_tensors_into(model, load_tensors(source / WEIGHTS), source / WEIGHTS)
    return Loop(cfg, TranslateTask(cfg, model, tokenizer, train_set, valid_set), run_dir, source, console), valid_data


def train_translator(
    config: TranslateConfig | dict | None = None, console=None, resume: bool = False, **overrides: Any
) -> TranslateResult:
    """Train an encoder-decoder translator; the function behind ``moekit train --task translate``.

    ``resume=True`` continues the run in ``out_dir`` from its last checkpoint (same data and settings).
    """
    base = config.to_dict() if isinstance(config, TranslateConfig) else dict(config or {})
    cfg = TranslateConfig.from_options({**base, **overrides}, "translation config")
    loop, valid_data = translate_loop(cfg, resume, console)
    run, model, tokenizer, train_set = loop.run(), loop.model, loop.task.tokenizer, loop.task.train_set
    bleu = None
    if cfg.bleu_sentences:
        n = min(cfg.bleu_sentences, len(valid_data))
        bleu = corpus_bleu(translate(model, tokenizer, valid_data.sources[:n]), valid_data.targets[:n])
    result = TranslateResult(
        loop.run_dir,
        run.step,
        run.history[-1]["valid_loss"],
        bleu,
        run.history,
        model.num_parameters(),
        model.active_parameters(),
        run.seconds,
        run.items / max(run.seconds, 1e-9),
    )
    atomic_write_json(
        loop.run_dir / "run.json",
        {
            "train": cfg.to_dict(),
            "model": model.config.to_dict(),
            "steps": run.step,
            "seconds": run.seconds,
            "tokens_per_second": result.tokens_per_second,
            "train_pairs": len(train_set),
            "valid_loss": result.valid_loss,
            "valid_bleu_greedy": bleu,
            "parameters": result.parameters,
            "active_parameters": result.active_parameters,
        },
    )
    return result


@torch.no_grad()
def validation_loss(model: Seq2SeqTransformer, pairs: Pairs, batch_tokens: int = 4096):
    """(mean token cross-entropy, each MoE layer's expert load [E]) over ``pairs``, teacher-forced."""
    was_training = model.training
    model.eval()
    total, count, loads = 0.0, 0, None
    for rows in pairs.batches(batch_tokens):
        src, src_mask, tgt_in, labels, tgt_mask = pairs.batch(rows)
        out = model(src, tgt_in, src_mask, tgt_mask, logits_mask=tgt_mask)
        total += float(F.cross_entropy(out.logits.float(), labels[tgt_mask], reduction="sum"))
        count += int(tgt_mask.sum())
        batch_loads = [aux.tokens_per_expert.clone() for aux in out.moe_aux]
        loads = batch_loads if loads is None else [a + b for a, b in zip(loads, batch_loads)]
    model.train(was_training)
    return total / max(1, count), loads or []


# -- checkpoints ---------------------------------------------------------------------------------
def _shuffled_batches(pairs: Pairs, batch_tokens: int, seed: int):
    """Endless batches (row lists) of similar-length pairs, regrouped and reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from reversed(pairs.batches(batch_tokens, generator))


def _upgrade_meta(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``model.json`` with its model config in today's spelling (old runs saved MoE fields flat)."""
    return {**saved, "seq2seq": Seq2SeqConfig.from_dict(saved["seq2seq"]).to_dict()}


def _meta(model: Seq2SeqTransformer) -> dict[str, Any]:
    return {"task": "translate", "seq2seq": model.config.to_dict()}


def save_translator(run_dir: str | Path, model: Seq2SeqTransformer, tokenizer: SubwordTokenizer) -> None:
    run_dir = Path(run_dir)
    tokenizer.save(run_dir)
    atomic_write_json(run_dir / META, _meta(model))
    save_tensors(model.state_dict(), run_dir / WEIGHTS)


def load_translator(path: str | Path) -> tuple[Seq2SeqTransformer, SubwordTokenizer]:
    """(model in eval mode, tokenizer) from a run folder of ``moekit train --task translate``."""
    run_dir = Path(path)
    if not (run_dir / META).is_file():
        raise CheckpointError(f"{run_dir} holds no translation model ({META} is missing)")
    try:
        meta = json.loads((run_dir / META).read_text(encoding="utf-8"))
        if meta.get("task") != "translate":
            raise CheckpointError(f"{run_dir} holds a {meta.get('task')!r} model, not a translation model")
        model = Seq2SeqTransformer(Seq2SeqConfig.from_dict(meta["seq2seq"]))
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{run_dir / META}: not a valid translation model description ({e})") from None
    tokenizer = SubwordTokenizer.load(run_dir)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(
            f"{run_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the model {model.config.vocab_size}"
        )
    ckpt.load_tensors_into(model, load_tensors(run_dir / WEIGHTS), run_dir / WEIGHTS)
    model.eval()
    return model, tokenizer
