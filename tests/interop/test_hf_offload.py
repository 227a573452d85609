"""Expert offload of Hugging Face folders in the hub layout (one tensor per expert): the experts stay in the file,
never stacked; the same greedy tokens and decode bits as the resident model for every MoE family, cached copies in
the resident layout, exact counters, budgets below one layer, and resident memory near the budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.errors import CheckpointError, ConfigError
from moekit.interop.hf.api import from_hf
from moekit.io.safe_io import load_tensors, read_safetensors_header, save_tensors
from moekit.nn.experts import Experts
from moekit.nn.offload import OffloadedExperts
from tests.interop.hf_models import MOE, make_hf_model, one_torch_thread, transformers  # noqa: F401
from tests.nn.test_offload import decode_logits, greedy

PROMPT = [5, 17, 99, 3, 100, 42, 8, 61, 7, 7, 110]


def save_per_expert(name: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random transformers model of family ``name`` saved by ``save_pretrained`` (the hub's per-expert layout)."""
    make_hf_model(name).to(dtype).save_pretrained(folder)
    assert any(".experts.0." in n for n in read_safetensors_header(folder / "model.safetensors")[0])
    return folder


@pytest.mark.parametrize("name", MOE)
def test_every_family_offloads_per_expert_tensors_with_the_resident_bits(tmp_path, name):
    folder = save_per_expert(name, tmp_path / "hf")
    resident = from_hf(folder)
    one = from_hf(folder, expert_memory="1GiB").expert_cache.expert_bytes((0, 0))
    budget = 3 * one // 2  # one expert and a half: far below one layer's experts
    offloaded = from_hf(folder, expert_memory=budget)
    moes = [m for m in offloaded.modules() if isinstance(m, OffloadedExperts)]
    assert moes and all(not e.fused_kernel for e in moes)
    # Nothing stacked: no expert weights among the model's tensors (all are in the file).
    assert not [n for n in offloaded.state_dict() if ".experts.w_" in n]
    for prompt in (PROMPT, [1]):  # batched prefill then decode; decode only
        assert greedy(offloaded, prompt) == greedy(resident, prompt)
    assert torch.equal(decode_logits(offloaded, PROMPT), decode_logits(resident, PROMPT))
    # The batched path runs each expert through the generic executor's GEMMs (not the fused kernel): the same sums
    # up to rounding, as for stacked offloaded experts (tests/nn/test_offload.py).
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        got, want = offloaded(x).logits.float(), resident(x).logits.float()
    assert (got - want).abs().max() <= 8 * torch.finfo(torch.float32).eps * want.abs().max()
    assert offloaded.expert_cache.held_bytes() <= budget
    assert offloaded.expert_cache.stats.lookups > 0


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_cached_copies_have_the_resident_layout_and_bits(tmp_path, name):
    folder = save_per_expert(name, tmp_path / "hf", torch.bfloat16)
    resident = from_hf(folder)
    offloaded = from_hf(folder, expert_memory="1MiB")
    stacks = [m for m in resident.modules() if type(m) is Experts]
    assert len(stacks) == len([m for m in offloaded.modules() if isinstance(m, OffloadedExperts)])
    for layer, r in enumerate(stacks):
        for e in range(r.num_experts):
            w_in, w_out = offloaded.expert_cache.get((layer, e))
            assert w_in.dtype == torch.bfloat16 and w_in.stride() == r.w_in[e].stride() and torch.equal(w_in, r.w_in[e])
            assert w_out.stride() == r.w_out[e].stride() and torch.equal(w_out, r.w_out[e])
    assert greedy(offloaded, PROMPT) == greedy(resident, PROMPT)
    assert torch.equal(decode_logits(offloaded, PROMPT), decode_logits(resident, PROMPT))


def test_batched_calls_read_through_the_cache_and_count_exactly(tmp_path):
    folder = save_per_expert("mixtral", tmp_path / "hf")  # 3 layers of 4 experts, all sparse
    probe = from_hf(folder, expert_memory="1GiB")
    one = probe.expert_cache.expert_bytes((0, 0))
    model = from_hf(folder, expert_memory=12 * one)  # every expert fits
    ran: list[int] = []
    for layer in model.layers:
        layer.mlp.register_forward_hook(lambda _m, _a, out: ran.append(int((out[1].tokens_per_expert > 0).sum())))
    stats = model.expert_cache.stats
    x = torch.tensor([[4, 9, 30, 31, 77]])
    with torch.inference_mode():
        model(x)
        first = sum(ran)  # experts the prompt ran: each looked up once, each a miss
        assert (stats.tokens, stats.lookups, stats.hits, stats.bytes_read) == (5, first, 0, first * one)
        model(x)  # the same prompt again: every expert it runs is held
    assert (stats.tokens, stats.lookups, stats.hits, stats.bytes_read) == (10, 2 * first, first, first * one)
    assert stats.mapped_bytes == 0 and stats.bytes_per_token == first * one / 10
    assert 0 < stats.hit_rate == 0.5


def test_a_budget_of_one_expert_runs_and_less_names_the_minimum(tmp_path):
    folder = save_per_expert("qwen3_moe", tmp_path / "hf")
    resident = from_hf(folder)
    one = from_hf(folder, expert_memory="1GiB").expert_cache.expert_bytes((0, 0))
    offloaded = from_hf(folder, expert_memory=one)
    assert greedy(offloaded, PROMPT) == greedy(resident, PROMPT)
    assert offloaded.expert_cache.held_bytes() <= one
    with pytest.raises(ConfigError, match=f"at least {one} bytes"):
        from_hf(folder, expert_memory=one - 1)


# ---------------------------------------------------------------------------------------------- resident memory

_PEAK = textwrap.dedent(
    """
    import json, sys
    import torch
    from moekit.interop.hf.api import from_hf
    from moekit.inference import generate
    model = from_hf(sys.argv[1], expert_memory=sys.argv[2])
    with torch.inference_mode():
        generate(model, [[5, 17, 99, 3, 250, 42, 8, 61] * 4], max_new_tokens=8, temperature=0)
    peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(json.dumps({"peak": peak}))
    """
)


def _peak(*argv: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def _write_hub_folder(folder: Path, layers: int, experts: int, hidden: int, width: int) -> dict[str, int]:
    """A Qwen3-MoE folder in the hub layout with random fp32 weights (names and shapes from transformers' own
    class, built on the meta device); bytes of the experts and of the rest."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=4,
        moe_intermediate_size=width,
        intermediate_size=2 * width,
        norm_topk_prob=True,
    )
    with torch.device("meta"):
        shapes: dict[str, tuple[int, ...]] = {
            name: t.shape for name, t in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    for name in [n for n in shapes if n.endswith(".mlp.experts.gate_up_proj")]:  # transformers 5 fuses in memory
        pre = name[: -len("gate_up_proj")]
        del shapes[name], shapes[pre + "down_proj"]
        for e in range(experts):  # what save_pretrained writes: one tensor per expert and matrix
            shapes.update({f"{pre}{e}.{p}.weight": (width, hidden) for p in ("gate_proj", "up_proj")})
            shapes[f"{pre}{e}.down_proj.weight"] = (hidden, width)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    assert any(".mlp.experts.0.gate_proj.weight" in name for name in tensors)
    folder.mkdir()
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    sizes = {"experts": 0, "other": 0}
    for name, t in tensors.items():
        sizes["experts" if ".experts." in name else "other"] += t.numel() * 4
    return sizes


def test_resident_memory_stays_near_the_budget_with_per_expert_tensors(tmp_path):
    # 8 layers x 64 experts x 3 x 256 x 256 x 4 B = 384 MiB of experts; a budget of 32 MiB.
    sizes = _write_hub_folder(tmp_path / "big", layers=8, experts=64, hidden=256, width=256)
    _write_hub_folder(tmp_path / "tiny", layers=1, experts=4, hidden=32, width=16)
    budget = 32 * 2**20
    baseline = _peak(str(tmp_path / "tiny"), str(budget))  # the interpreter, torch's libraries, first-use setup
    peak = _peak(str(tmp_path / "big"), str(budget))
    assert sizes["experts"] > 10 * budget
    # What may be resident beyond that: the non-expert weights, the budget, and 64 MiB for activations, the KV
    # cache, the experts being run and the allocator's slack. Batched calls fetch experts through the cache too,
    # so not even one layer's experts (48 MiB) comes on top; stacking them would add all 384 MiB.
    assert peak - baseline < sizes["other"] + budget + 64 * 2**20, (peak, baseline, sizes)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_expert_holding_nan_or_inf_is_refused_when_read(tmp_path, bad):
    folder = save_per_expert("mixtral", tmp_path / "hf", torch.bfloat16)
    tensors = {name: t.clone() for name, t in load_tensors(folder / "model.safetensors").items()}
    tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"][3, 5] = bad  # w3 (up): the second span of w_in
    save_tensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model = from_hf(folder, expert_memory="1MiB")  # loading reads no expert
    model.expert_cache.get((0, 1))
    with pytest.raises(CheckpointError, match=r"\(0, 2\) holds NaN or infinite values"):
        model.expert_cache.get((0, 2))


def test_a_model_whose_experts_are_in_the_file_is_not_written(tmp_path):
    from moekit.interop.hf.api import save_moekit_checkpoint, to_hf

    model = from_hf(save_per_expert("mixtral", tmp_path / "hf"), expert_memory="1MiB")
    with pytest.raises(ConfigError, match="without expert_memory"):
        to_hf(model, tmp_path / "out")  # would write a folder without experts
    with pytest.raises(ConfigError, match="without expert_memory"):
        save_moekit_checkpoint(model, tmp_path / "ckpt", None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()
