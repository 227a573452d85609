"""moekit finetune: each method trains what it says and nothing else (frozen weights bit-identical, optimizer
state only for trainables), ESFT's selection, adapters saved beside the checkpoint, load and merge."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.checkpoint import resolve_checkpoint
from moekit.errors import CheckpointError, ConfigError
from moekit.recipes.esft import read_selection, select_experts
from moekit.recipes.finetune import (
    ADAPTER_FILE,
    FinetuneConfig,
    FinetuneTrainer,
    load_finetuned,
    merge_adapter,
    trainable_parameters,
)
from moekit.train import train
from moekit.train.config import TrainConfig

PROSE = "The old house stood at the end of the lane, and every evening the lamps were lit at six. " * 40
MATH = "12 + 30 = 42. 7 * 6 = 42. 100 - 58 = 42. 84 / 2 = 42. " * 60
RUN = dict(
    model="tiny", batch_size=4, block_size=32, eval_interval=1000, eval_batches=2, progress=False, tensorboard=False
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "prose.txt").write_text(PROSE)
    (root / "math.txt").write_text(MATH)
    base = root / "base"
    train(dict(RUN, data=str(root / "prose.txt"), max_steps=3, out_dir=str(base)))
    return root, base


def run_method(data, tmp_path, **ft) -> FinetuneTrainer:
    root, base = data
    config = TrainConfig.from_options(
        dict(RUN, data=str(root / "math.txt"), init_from=str(base), max_steps=2, lr=1e-2, out_dir=str(tmp_path / "ft"))
    )
    return FinetuneTrainer(config, FinetuneConfig(**ft))


def named(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_esft_trains_only_the_selected_experts(data, tmp_path):
    trainer = run_method(data, tmp_path, method="esft", esft="token", top_p=0.5)
    model = trainer.model
    selection = trainer.chosen["selection"]
    before = named(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert state_params == {id(p) for p in trainable}  # the optimizer knows only what trains
    E = model.config.moe.num_experts
    assert trainable_parameters(model) == sum(len(s) for s in selection.values()) * (
        model.layers[0].mlp.experts.frozen_w_in[0].numel() + model.layers[0].mlp.experts.frozen_w_out[0].numel()
    )
    result = trainer.run()
    after = named(model)
    assert set(before) == set(after)
    position = {f"layers.{i}.mlp.": n for n, (i, _) in enumerate(model.moe_layers())}  # block -> MoE layer number
    for name in before:
        if name.endswith(("experts.w_in", "experts.w_out")):
            chosen = selection[position[name.rsplit("experts.", 1)[0]]]
            for e in range(E):
                same = torch.equal(before[name][e], after[name][e])
                assert same == (e not in chosen), (name, e)
        else:
            assert torch.equal(before[name], after[name]), name  # everything else frozen, bit for bit
    # The optimizer holds state for the chosen experts' rows only: [S, D, X] per layer.
    shapes = sorted(tuple(s["exp_avg"].shape) for s in trainer.optimizer.state.values())
    assert all(shape[0] < E for shape in shapes)
    saved = read_selection(result.run_dir / "esft_selection.json")
    assert saved == selection
    record = json.loads((result.run_dir / "esft_selection.json").read_text())
    assert record["relevance"] == "token" and len(record["layers"][0]["scores"]) == E
    reloaded = moekit.load(result.checkpoint)  # a plain checkpoint with the trained experts in place
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, after[name]), name


def test_lora_trains_only_adapters_and_router_and_saves_them_apart(data, tmp_path):
    trainer = run_method(data, tmp_path, method="lora", lora_rank=2, lora_dropout=0.1)
    model = trainer.model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or ".router." in n for n in names)
    before = {k: v for k, v in named(model).items() if ".lora_" not in k and ".router." not in k}
    result = trainer.run()
    for name, tensor in before.items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    ckpt_dir = result.checkpoint
    assert (ckpt_dir / ADAPTER_FILE).is_file()
    base = moekit.load(ckpt_dir)  # the model file holds no adapter
    assert not any("lora_" in k for k in base.state_dict())
    adapted, _ = load_finetuned(ckpt_dir)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, model(ids).logits, rtol=0, atol=0)
        merged_dir = merge_adapter(ckpt_dir, tmp_path / "merged")
        merged = moekit.load(merged_dir)
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_esft_lora_and_freeze_router(data, tmp_path):
    trainer = run_method(data, tmp_path, method="esft+lora", esft="gate", top_p=0.3)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all(".experts.lora_" in n for n in names)
    for n, (_, layer) in enumerate(trainer.model.moe_layers()):
        assert layer.experts.lora_experts.tolist() == trainer.chosen["selection"][n]
    full = run_method(data, tmp_path / "b", method="full", freeze_router=True)
    frozen = [n for n, p in full.model.named_parameters() if not p.requires_grad]
    assert frozen and all(".router." in n for n in frozen)


def test_select_experts_keeps_the_fewest_reaching_top_p():
    scores = [torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64)]
    assert select_experts(scores, 0.2) == {0: [1]}
    assert select_experts(scores, 0.5) == {0: [1]}
    assert select_experts(scores, 0.6) == {0: [1, 3]}
    assert select_experts(scores, 1.0) == {0: [0, 1, 2, 3]}
    with pytest.raises(ConfigError, match="top_p"):
        select_experts(scores, 0.0)


def test_finetune_errors(data, tmp_path):
    root, base = data
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        FinetuneTrainer(TrainConfig.from_options(dict(RUN, init_from=str(base), out_dir=str(base))), FinetuneConfig())
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="qlora")
    with pytest.raises(ConfigError, match="init-from"):
        FinetuneTrainer(TrainConfig.from_options(dict(RUN, out_dir=str(tmp_path / "x"))), FinetuneConfig())
    with pytest.raises(ConfigError, match="trainable"):
        FinetuneTrainer(
            TrainConfig.from_options(dict(RUN, init_from=str(base), trainable="router", out_dir=str(tmp_path / "y"))),
            FinetuneConfig(),
        )


def test_finetune_and_merge_adapter_from_the_command_line(data, tmp_path, capsys):
    from moekit.cli import main

    root, base = data
    common = ["--data", root / "math.txt", "--max-steps", 2, "--batch-size", 2, "--block-size", 16]
    common += ["--progress", "false", "--tensorboard", "false", "--eval-batches", 1]
    args = ["finetune", "--init-from", base, "--method", "esft+lora", "--esft", "token", "--top-p", 0.3]
    args += ["--calibration-data", root / "math.txt", "--lora-rank", 2, "--out", tmp_path / "run", *common]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "esft+lora: training" in out and "val_loss=" in out
    assert (tmp_path / "run" / "esft_selection.json").is_file()
    assert main(["merge-adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    assert moekit.load(tmp_path / "merged").config.moe is not None
    bad = ["finetune", "--init-from", str(base), "--method", "esft", "--calibration-data", str(tmp_path / "no.txt")]
    assert main(bad + [str(a) for a in common] + ["--out", str(tmp_path / "bad")]) == 2
    assert "moekit finetune: error:" in capsys.readouterr().err
    assert main(["merge-adapter", str(base), "--out", str(tmp_path / "m2")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_trainable_share_counts_the_frozen_experts(data, tmp_path):
    trainer = run_method(data, tmp_path, method="esft", top_p=0.2)
    full = run_method(data, tmp_path / "full", method="full")
    assert trainer.total_parameters == full.total_parameters == trainable_parameters(full.model)
    assert trainable_parameters(trainer.model) < trainer.total_parameters // 4


def test_lora_fine_tune_of_a_hugging_face_folder_exports_back(data, tmp_path):
    """HF folder -> moekit finetune (LoRA) -> convert --to-hf: transformers + peft give the fine-tune's logits."""
    pytest.importorskip("peft")
    import transformers
    from peft import PeftModel

    from moekit.interop.hf import convert_to_hf, to_hf

    root, base = data
    hf_dir = to_hf(moekit.load(base), tmp_path / "hf", tokenizer=resolve_checkpoint(base), family="qwen2_moe")
    trainer = run_method((root, hf_dir), tmp_path, method="lora", lora_rank=2, lora_targets=("experts", "attention"))
    result = trainer.run()
    out = convert_to_hf(result.checkpoint, tmp_path / "back")
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    model, _ = load_finetuned(result.checkpoint)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = PeftModel.from_pretrained(hf, out / "adapter").eval()(ids).logits
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-4)
