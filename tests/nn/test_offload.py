"""Expert offload: same greedy tokens and decode bits as the resident model, the cache within its budget, exact
hit and byte counts, sizes parsed, clear errors, and a process whose experts outsize its memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.checkpoint import load_model, model_tensors, write_model_folder
from moekit.data.tokenizers import ByteTokenizer
from moekit.errors import CheckpointError, ConfigError
from moekit.inference import generate
from moekit.interop.hf.api import from_hf
from moekit.io.safe_io import load_tensors, save_tensors
from moekit.models import LMConfig, MoELM
from moekit.nn import MoEConfig
from moekit.nn.expert_cache import ExpertCache
from moekit.nn.offload import OffloadedExperts, offload_experts, offload_stats, parse_size

D, H, E = 32, 16, 8
EXPERT_BYTES_FP32 = 3 * D * H * 4  # w_in [D, 2H] + w_out [H, D]


def make_checkpoint(folder: Path, dtype: torch.dtype = torch.float32, layers: int = 2, **moe) -> Path:
    moe_fields = dict(num_experts=E, top_k=2, expert_hidden_size=H, **moe)
    config = LMConfig(
        vocab_size=256,
        hidden_size=D,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        scaled_residual_init=False,
        moe=MoEConfig(**moe_fields),
    )
    torch.manual_seed(0)
    model = MoELM(config).to(dtype)
    return write_model_folder(folder, model_tensors(model), {"model": config.to_dict()}, ByteTokenizer())


def greedy(model, prompt: list[int], n: int = 12) -> list[int]:
    with torch.inference_mode():
        return generate(model, [prompt], max_new_tokens=n, temperature=0)[0]


def decode_logits(model, prompt: list[int]) -> torch.Tensor:
    """Logits of one-token steps (the few-token decode path) fed the prompt token by token."""
    cache, out = model.new_cache(len(prompt)), []
    with torch.inference_mode():
        for token in prompt:
            out.append(model(torch.tensor([[token]]), cache=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget_experts", [1, 3, 2 * E])
def test_same_tokens_and_decode_bits_as_the_resident_model(tmp_path, dtype, budget_experts):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype)
    resident, _ = load_model(ckpt)
    budget = budget_experts * EXPERT_BYTES_FP32 * dtype.itemsize // 4
    offloaded, _ = load_model(ckpt, expert_memory=budget)
    assert all(isinstance(layer.mlp.experts, OffloadedExperts) for layer in offloaded.layers)
    prompts = ([5, 17, 99, 3, 250, 42, 8, 61, 7, 7, 120], [1])  # batched prefill, then decode; decode only
    for prompt in prompts:
        assert greedy(offloaded, prompt) == greedy(resident, prompt)
    # The decode path runs each expert through the resident code on a same-layout copy: the same bits.
    assert torch.equal(decode_logits(offloaded, prompts[0]), decode_logits(resident, prompts[0]))
    # The batched path combines through the generic executor (the combine weight after the second GEMM, not
    # before): the same sums up to rounding, within 8 units in the last place of the largest logit
    # (rounding differences grow through the layers).
    x = torch.tensor([prompts[0]])
    with torch.inference_mode():
        got, want = offloaded(x).logits.float(), resident(x).logits.float()
    assert (got - want).abs().max() <= 8 * torch.finfo(dtype).eps * want.abs().max()
    stats = offload_stats(offloaded)
    assert stats is not None and stats.lookups > 0 and 0 <= stats.hit_rate <= 1
    assert offloaded.expert_cache.held_bytes() <= budget


def save_hf_qwen3_moe(folder: Path, fused: bool) -> Path:
    """A random bf16 Qwen3-MoE saved by transformers (one tensor per expert), or rewritten in the fused layout."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=E,
        num_experts_per_tok=2,
        moe_intermediate_size=H,
        intermediate_size=64,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    if fused:  # gate_up_proj [E, 2I, D] (gate rows, then up) and down_proj [E, D, I], as transformers 5 holds them
        tensors = {name: t.clone() for name, t in load_tensors(folder / "model.safetensors").items()}
        for layer in range(2):
            pre = f"model.layers.{layer}.mlp.experts"
            parts = {p: [tensors.pop(f"{pre}.{e}.{p}.weight") for e in range(E)] for p in ("gate_proj", "up_proj")}
            gate_up = [torch.cat([g, u]) for g, u in zip(parts["gate_proj"], parts["up_proj"])]
            tensors[f"{pre}.gate_up_proj"] = torch.stack(gate_up)
            tensors[f"{pre}.down_proj"] = torch.stack([tensors.pop(f"{pre}.{e}.down_proj.weight") for e in range(E)])
        save_tensors(tensors, folder / "model.safetensors")
    return folder


def test_hf_fused_layout_stays_a_transposed_view_and_decodes_the_same(tmp_path):
    folder = save_hf_qwen3_moe(tmp_path / "hf", fused=True)
    resident = from_hf(folder)
    offloaded = from_hf(folder, expert_memory=3 * EXPERT_BYTES_FP32 // 2)
    w_in = offloaded.layers[0].mlp.experts.w_in
    assert not w_in[0].is_contiguous() and w_in[0].t().is_contiguous()  # HF's [2I, D] rows, transposed
    cached_w_in, _ = offloaded.expert_cache.get((0, 0))
    assert cached_w_in.stride() == w_in[0].stride() and torch.equal(cached_w_in, w_in[0])
    prompt = [3, 9, 27, 11, 2, 60]
    assert greedy(offloaded, prompt) == greedy(resident, prompt)
    assert torch.equal(decode_logits(offloaded, prompt), decode_logits(resident, prompt))


@pytest.mark.parametrize("fused", [False, True])
def test_cast_weights_are_refused_clearly(tmp_path, fused):
    folder = save_hf_qwen3_moe(tmp_path / "hf", fused=fused)
    with pytest.raises(CheckpointError, match="own dtype"):  # a cast copy is not the file's bytes
        from_hf(folder, dtype=torch.float32, expert_memory="1MiB")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cache_holds_at_most_its_budget_and_counts_exactly(tmp_path, policy):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=1)
    model, _ = load_model(ckpt)
    cache: ExpertCache = offload_experts(model, 2 * EXPERT_BYTES_FP32, policy=policy)
    w_in = model.layers[0].mlp.experts.w_in
    # Hand-checkable: 2 slots; a a b a c (c evicts the LRU b; LFU also b: a has 3 uses) a b.
    for e in (0, 0, 1, 0, 2, 0, 1):
        got, _ = cache.get((0, e))
        assert torch.equal(got, w_in[e])
        assert cache.held_bytes() <= cache.capacity
    # misses: a, b, c, b (evicted by c): 4 of 7
    assert (cache.stats.lookups, cache.stats.hits) == (7, 3)
    assert cache.stats.bytes_read == 4 * EXPERT_BYTES_FP32
    assert cache.resident() == [(0, 0), (0, 1)]


def test_lfu_keeps_the_frequent_expert_where_lru_drops_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=1)
    resident_after = {}
    for policy in ("lru", "lfu"):
        cache = offload_experts(load_model(ckpt)[0], 2 * EXPERT_BYTES_FP32, policy=policy)
        for e in (0, 0, 0, 1, 2):  # a is used most, but b is more recent when c arrives
            cache.get((0, e))
        resident_after[policy] = sorted(cache.resident())
    assert resident_after == {"lru": [(0, 1), (0, 2)], "lfu": [(0, 0), (0, 2)]}


def test_tokens_and_bytes_per_token(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=2)
    model, _ = load_model(ckpt, expert_memory=E // 2 * EXPERT_BYTES_FP32)  # 4 of the 16 experts
    ran = []  # experts each MoE call ran
    for layer in model.layers:
        layer.mlp.register_forward_hook(lambda _m, _a, out: ran.append(int((out[1].tokens_per_expert > 0).sum())))
    stats = model.expert_cache.stats
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))  # batched: read through the map, the cache untouched
        assert (stats.tokens, stats.lookups, stats.bytes_read) == (3, 0, 0)
        assert stats.mapped_bytes == sum(ran) * EXPERT_BYTES_FP32
        model(torch.tensor([[4]]))  # one decode-sized step: top-2 in each of 2 layers, all misses
    assert (stats.tokens, stats.lookups, stats.hits) == (4, 4, 0)
    assert stats.bytes_read == 4 * EXPERT_BYTES_FP32
    assert stats.bytes_per_token == (sum(ran[:2]) + 4) * EXPERT_BYTES_FP32 / 4


def test_prefetch_reads_ahead_and_keeps_the_tokens(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", layers=3)
    resident, _ = load_model(ckpt)
    model, _ = load_model(ckpt)
    offload_experts(model, 6 * EXPERT_BYTES_FP32, prefetch=True)
    prompt = [5, 17, 99, 3]
    assert greedy(model, prompt, 16) == greedy(resident, prompt, 16)
    stats = model.expert_cache.stats
    assert stats.prefetched > 0 and stats.prefetch_bytes == stats.prefetched * EXPERT_BYTES_FP32
    model.expert_cache.close()


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("4GiB", 4 * 2**30), ("1.5GB", 1_500_000_000), ("300MB", 300 * 10**6), ("1024", 1024)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "4XB", "-1GiB", "0", "1.5.2GB"])
def test_parse_size_rejects_bad_sizes(text):
    with pytest.raises(ConfigError, match="expert memory"):
        parse_size(text)


def test_budget_below_one_expert_names_the_minimum(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=f"at least {EXPERT_BYTES_FP32} bytes"):
        load_model(ckpt, expert_memory=EXPERT_BYTES_FP32 - 1)


# ---------------------------------------------------------------------------------------------- resident memory

_PEAK = textwrap.dedent(
    """
    import json, sys
    import torch, moekit
    from moekit.checkpoint import load_model
    from moekit.inference import generate
    model, _ = load_model(sys.argv[1], expert_memory=sys.argv[2])
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


def test_resident_memory_stays_near_the_budget_when_experts_are_much_larger(tmp_path):
    # 8 layers x 64 experts x 3 x 256 x 256 x 4 B = 384 MiB of experts; a budget of 32 MiB.
    layers, experts, hidden, width = 8, 64, 256, 256
    config = LMConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        moe=MoEConfig(num_experts=experts, top_k=4, expert_hidden_size=width),
    )
    with torch.device("meta"):
        model = MoELM(config)
    tensors = {name: torch.randn(t.shape) * 0.02 for name, t in model.state_dict().items()}  # untied
    expert_bytes = sum(t.numel() * 4 for name, t in tensors.items() if ".experts." in name)
    other_bytes = sum(t.numel() * 4 for name, t in tensors.items() if ".experts." not in name)
    ckpt = write_model_folder(tmp_path / "big", tensors, {"model": config.to_dict()}, ByteTokenizer())
    del tensors
    budget = 32 * 2**20
    # The same run on a tiny model: the interpreter, torch's libraries and kernels' first-use setup.
    baseline = _peak(str(make_checkpoint(tmp_path / "tiny")), str(budget))
    peak = _peak(str(ckpt), str(budget))
    assert expert_bytes > 10 * budget
    # What may be resident beyond that: the non-expert weights, the budget, one layer's experts (the prompt's
    # batched call reads them through the map, then drops them), and 64 MiB for activations, the KV cache and
    # the allocator's slack; keeping what was read through the map would add all 384 MiB of experts.
    layer_bytes = expert_bytes // layers
    assert peak - baseline < other_bytes + budget + layer_bytes + 64 * 2**20, (peak, baseline, expert_bytes)
