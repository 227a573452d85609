"""PEFT export: transformers + peft load the exported base and adapter and give moekit's logits (fp32, 1e-4),
PEFT's merge equals the adapter applied, and what PEFT cannot express is a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import checkpoint as ckpt
from moekit.data.tokenizers import ByteTokenizer
from moekit.errors import ConfigError
from moekit.interop.hf import convert_to_hf
from moekit.interop.hf.peft_export import write_peft_adapter
from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig
from moekit.nn.lora import ADAPTER_FILE, LoRAConfig, apply_lora, save_adapter
from moekit.recipes.finetune import base_tensors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAMILIES = {
    "mixtral": dict(norm_topk_prob=True),
    "qwen2_moe": dict(num_shared_experts=1, shared_expert_gate=True, shared_expert_hidden_size=24),
}


def make_model(family: str, experts: dict | None = None) -> MoELM:
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, **FAMILIES[family]),
    )
    return MoELM(config).eval()


def randomise_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def finetuned_checkpoint(tmp_path, family: str, lora: LoRAConfig, experts=None) -> tuple[MoELM, object]:
    model = make_model(family)
    apply_lora(model, lora, experts)
    randomise_adapters(model)
    folder = tmp_path / "ckpt"
    ckpt.write_model_folder(folder, base_tensors(model), {"model": model.config.to_dict()}, ByteTokenizer())
    save_adapter(model, lora, folder / ADAPTER_FILE)
    return model, folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_loads_the_exported_adapter_with_moekit_logits(tmp_path, family):
    targets = ("attention", "experts", "shared_experts") if family == "qwen2_moe" else ("attention", "experts")
    lora = LoRAConfig(rank=2, alpha=6, targets=targets)
    model, folder = finetuned_checkpoint(tmp_path, family, lora)
    out = convert_to_hf(folder, tmp_path / "hf", family=family)
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        base = hf(ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
        got = peft_model(ids).logits
        assert not torch.allclose(base, expected, atol=1e-3)  # the adapter matters
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4)


def test_esft_lora_adapter_exports_with_zero_pairs_for_unselected_experts(tmp_path):
    lora = LoRAConfig(rank=2, targets=("experts",))
    subsets = {"layers.0.mlp.experts": [1], "layers.1.mlp.experts": [0, 3]}
    model, folder = finetuned_checkpoint(tmp_path, "mixtral", lora, subsets)
    out = convert_to_hf(folder, tmp_path / "hf", family="mixtral")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()(ids).logits
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-4)


def test_what_peft_cannot_express_is_an_error(tmp_path):
    model = make_model("mixtral")
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        write_peft_adapter(model, LoRAConfig(), tmp_path / "a", "mixtral")
    apply_lora(model, LoRAConfig(targets=("experts",)))
    with pytest.raises(ConfigError, match="family 'llama'"):
        write_peft_adapter(model, LoRAConfig(), tmp_path / "b", "llama")
