"""Expert offload: a model's expert weights stay in their checkpoint file, at most ``expert_memory`` bytes resident.

:func:`offload_experts` swaps every MoE layer's :class:`~moekit.nn.experts.Experts` for :class:`OffloadedExperts`,
which know where each expert's matrices are in the file (:class:`~moekit.nn.expert_cache.Span`). Two layouts:

* Stacked (moekit checkpoints, HF fused ``gate_up_proj``): ``w_in``/``w_out`` stay the memory-mapped views of the
  file, which cost nothing until touched.
* In file, no stacks (HF's hub layout with one tensor per expert, a GGUF's float ``ffn_*_exps``): the importer
  records each expert's spans instead of stacking (:func:`keep_in_file`); gate and up are separate spans that the
  cache reads into the two halves of one ``w_in`` copy. Such a layer has no ``w_in``/``w_out`` parameters.

* Decode steps (the MoE layer's few-token path, :meth:`Experts.run_one`) fetch an expert's two matrices from one
  :class:`~moekit.nn.expert_cache.ExpertCache` shared by all layers (one budget for the model), keyed by (layer,
  expert). A miss reads the expert's bytes with ``os.preadv`` at their offsets in the file: reading through the map
  would count every touched page in the process's resident set, which would grow to the whole file. The copy keeps
  the resident tensor's memory layout (HF experts are transposed views) and runs through :class:`Experts`' own code:
  the resident model's bits.
* A batched call (a prompt) wants most of a layer's experts. Stacked: the layer runs its fused kernel on the
  mapped views, the resident model's computation, and then drops the pages it touched (``madvise``); while it
  runs, one layer's experts are resident beyond the budget. In file: each expert with rows is fetched through the
  cache and runs its rows (the generic executor's per-expert GEMMs), so the budget holds (plus the experts being
  run); a prompt then reads every expert it routes to that the cache does not hold.

Eviction: ``"lru"`` (least recently used; the default, see benchmarks/results/offload.md) or ``"lfu"``
(fewest uses since loading, ties by recency). With ``prefetch``, the MoE layer l's input, scored by layer
l+1's router, names the experts layer l+1 will likely want; a background thread reads them meanwhile.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import CheckpointError, ConfigError
from moekit.io.mapped import release_pages
from moekit.nn import few_tokens
from moekit.nn.expert_cache import ExpertCache, ExpertSpans, OffloadStats, Span
from moekit.nn.experts import Experts, expert_row
from moekit.nn.kernels.fused_experts import activate
from moekit.nn.kernels.grouped_mm import cast, compute_dtype, expert_slices, mm_into
from moekit.nn.kernels.schedule import run_jobs
from moekit.nn.moe import MoE
from moekit.nn.router import TopKRouter

EXPERT_MEMORY_HELP = "keep the experts in the checkpoint file, at most SIZE of them in memory (512MiB, 4GiB, 1.5GB)"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes from ``4GiB``, ``512MiB``, ``1.5GB``, ``300MB`` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ConfigError(f"expert memory {text!r} is not a size such as 512MiB, 4GiB, 1.5GB or a number of bytes")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"expert memory {text!r} must be more than 0 bytes")
    return size


class OffloadedExperts(Experts):
    """One MoE layer's experts kept in their file: decode steps read them through a shared :class:`ExpertCache`;
    batched calls run the fused kernel on the mapped stacks, or, where there are none (:meth:`in_file`), fetch
    each expert through the cache (see the module docstring)."""

    layer: int  # this layer's index among the model's MoE layers (the cache key's first half)
    cache: ExpertCache  # both set by :meth:`attach`

    def __init__(self, experts: Experts, spans: list[ExpertSpans], stacked: bool):
        nn.Module.__init__(self)  # no parameters of its own: a stacked layer keeps the mapped ones
        self.activation, self.num_experts = experts.activation, experts.num_experts
        self.hidden_size, self.expert_hidden_size = experts.hidden_size, experts.expert_hidden_size
        self.spans, self.fused_kernel = spans, stacked
        if stacked:
            self.w_in, self.w_out = experts.w_in, experts.w_out

    @classmethod
    def of_stacks(cls, experts: Experts) -> OffloadedExperts:
        """Experts whose ``w_in``/``w_out`` stacks are views of a mapped file, which stay the parameters."""
        spans = [
            (Span.of(experts.w_in[e], f"w_in of expert {e}"), Span.of(experts.w_out[e], f"w_out of expert {e}"))
            for e in range(experts.num_experts)
        ]
        return cls(experts, spans, stacked=True)

    @classmethod
    def in_file(cls, experts: Experts, spans: list[ExpertSpans]) -> OffloadedExperts:
        """Experts the size of ``experts`` (e.g. still on the meta device) found only at ``spans`` (no stacks)."""
        if len(spans) != experts.num_experts:
            raise CheckpointError(f"expert offload: {len(spans)} experts' spans for {experts.num_experts} experts")
        return cls(experts, spans, stacked=False)

    def attach(self, layer: int, cache: ExpertCache) -> None:
        """Register this layer's experts in ``cache`` under (``layer``, expert)."""
        self.layer, self.cache = layer, cache
        for e, spans in enumerate(self.spans):
            cache.add_expert((layer, e), spans)

    def inactive_parameters(self, runs: int) -> int:
        per_expert = sum(math.prod(span.shape) for span in self.spans[0])
        return per_expert * (self.num_experts - runs)

    def run_one(self, e: int, x_1D: torch.Tensor) -> torch.Tensor:
        w_in, w_out = self.cache.get((self.layer, e))
        return expert_row(w_in, w_out, self.activation, x_1D)  # Experts' own code, same layout: the same bits

    def forward(self, x_ND: torch.Tensor, counts: tuple[int, ...], dropout: float = 0.0) -> torch.Tensor:
        """Rows sorted by expert through their experts, each fetched through the cache: :meth:`Experts.forward`'s
        per-expert GEMMs (the same dtypes), without the stacks."""
        if self.fused_kernel:
            return super().forward(x_ND, counts, dropout)
        if torch.is_autocast_enabled(x_ND.device.type):
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        cdt = compute_dtype(x_ND.dtype, x_ND.device)
        out_ND = x_ND.new_empty(x_ND.shape[0], self.hidden_size)

        def job(s: tuple[int, int, int]) -> None:
            e, lo, hi = s
            w_in, w_out = (cast(cast(w, x_ND.dtype), cdt) for w in self.cache.get((self.layer, e)))
            h_nX = x_ND.new_empty(hi - lo, w_in.shape[1])
            mm_into(h_nX, cast(x_ND[lo:hi], cdt), w_in)
            a_nH = activate(h_nX, self.activation)
            if dropout > 0:
                a_nH = F.dropout(a_nH, dropout)
            mm_into(out_ND[lo:hi], cast(a_nH, cdt), w_out)

        slices = list(expert_slices(counts))
        run_jobs(job, slices, x_ND.device, cost=[hi - lo for _, lo, hi in slices])
        return out_ND

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """One expert on its rows through the cache (the reference and analysis)."""
        w_in, w_out = self.cache.get((self.layer, e))
        return activate(x_nD @ w_in.to(x_nD.dtype), self.activation) @ w_out.to(x_nD.dtype)

    def release(self, tokens_per_expert: torch.Tensor) -> None:
        """After a batched call on the stacks: count the bytes of the experts it ran and drop the pages it touched
        (in-file layers read through the cache, which counts its reads)."""
        if not self.fused_kernel:
            return
        ran = tokens_per_expert.nonzero().flatten().tolist()
        self.cache.stats.mapped_bytes += sum(self.cache.expert_bytes((self.layer, e)) for e in ran)
        release_pages(self.w_in)
        release_pages(self.w_out)


def keep_in_file(model: nn.Module, spans: Mapping[int, list[ExpertSpans]]) -> None:
    """Before loading: give the MoE layers ``model.layers[i]`` for each ``i`` in ``spans`` experts found only at those
    spans (:meth:`OffloadedExperts.in_file`); :func:`offload_experts` then attaches them to the cache."""
    layers = model.layers
    assert isinstance(layers, nn.ModuleList)
    for index, layer_spans in spans.items():
        moe = layers[index].mlp
        assert isinstance(moe, MoE) and isinstance(moe.experts, Experts)
        moe.experts = OffloadedExperts.in_file(moe.experts, layer_spans)


def offload_experts(
    model: nn.Module, expert_memory: str | int, policy: str = "lru", prefetch: bool = False
) -> ExpertCache:
    """Swap every MoE layer's experts of ``model`` (loaded from mapped safetensors or GGUF on the CPU, or kept in
    the file by :func:`keep_in_file`) for :class:`OffloadedExperts` sharing one cache of ``expert_memory`` bytes;
    also kept as ``model.expert_cache``."""
    cache = ExpertCache(parse_size(expert_memory), policy, prefetch)
    layers = [m for m in model.modules() if isinstance(m, MoE) and _offloadable(m.experts)]
    if not layers:
        raise ConfigError("expert offload: the model has no MoE layers with stacked experts")
    stacked = [layer.experts.w_in for layer in layers if type(layer.experts) is Experts]
    if any(w.device.type != "cpu" for w in stacked):
        raise ConfigError("expert offload keeps experts in host memory: load the model on the CPU")
    for index, layer in enumerate(layers):
        experts = layer.experts
        if not isinstance(experts, OffloadedExperts):
            assert isinstance(experts, Experts)
            experts = OffloadedExperts.of_stacks(experts)
        experts.attach(index, cache)
        layer.experts = experts
        layer.register_forward_hook(_release_after_batched_call, with_kwargs=True)
    layers[0].register_forward_pre_hook(lambda _m, args: _count_tokens(cache, args[0]))
    if prefetch:
        for index, (layer, following) in enumerate(zip(layers, layers[1:])):
            layer.register_forward_pre_hook(_prefetcher(cache, index + 1, following))
    model.expert_cache = cache  # type: ignore[assignment]  # (nn.Module types attributes as Tensor | Module)
    return cache


def _offloadable(experts: nn.Module) -> bool:
    """Plain stacked experts, or ones :func:`keep_in_file` made and no cache holds yet."""
    return type(experts) is Experts or (isinstance(experts, OffloadedExperts) and not hasattr(experts, "cache"))


def is_expert_weight(name: str) -> bool:
    """Whether a model's state-dict name is a routed experts' stacked weight (what offload keeps in the file)."""
    return name.endswith((".experts.w_in", ".experts.w_out"))


def offload_stats(model: nn.Module) -> OffloadStats | None:
    """The expert cache's counters of a model loaded with ``expert_memory``, else None."""
    cache = getattr(model, "expert_cache", None)
    return cache.stats if isinstance(cache, ExpertCache) else None


def _release_after_batched_call(layer: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
    """A post-hook: a call that did not take the few-token path read experts through the map (see module doc)."""
    assert isinstance(layer, MoE)
    bound = inspect.signature(layer.forward).bind(*args, **kwargs).arguments
    if not few_tokens.applies(layer, bound["x"], bound.get("mask"), bound.get("record_routing", False)):
        experts = layer.experts
        assert isinstance(experts, OffloadedExperts)
        experts.release(output[1].tokens_per_expert)


def _count_tokens(cache: ExpertCache, x: torch.Tensor) -> None:
    cache.stats.tokens += x.numel() // x.shape[-1]


_PREFETCH_TOKENS = 2


def _prefetcher(cache: ExpertCache, layer: int, moe: MoE):
    """A pre-hook that scores layer ``layer``'s experts on the current MoE input and prefetches its picks."""
    router = moe.router

    def hook(_module: nn.Module, args: tuple) -> None:
        x_TD = args[0].reshape(-1, args[0].shape[-1])
        # Decode steps only: a prompt's many tokens want most experts, more than a budget holds.
        if not isinstance(router, TopKRouter) or x_TD.shape[0] > _PREFETCH_TOKENS:
            return
        idx_TK = router.choose(router.logits(x_TD))[0]
        cache.prefetch([(layer, e) for e in sorted(set(idx_TK.flatten().tolist()))])

    return hook
