"""The routing recorder: outputs unchanged, streaming equals one shot, traces, drift, any model."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis import stats, tokens
from moekit.analysis.capture import capture_routing, find_moe_layers
from moekit.analysis.load import expert_load
from moekit.analysis.recorder import DriftMeter, RoutingRecorder
from moekit.analysis.traces import read_traces
from moekit.errors import ConfigError
from moekit.nn import MoE
from tests.analysis.helpers import tiny_model

ROUTERS = [
    {},
    {"router": "sigmoid_topk"},
    {"router": "expert_threshold"},  # a variable number of experts per token (expert choice: not in a causal LM)
    {"router": "hash", "top_k": 1},
    {"router": "dense"},
    {"capacity_factor": 0.5},
    {"num_shared_experts": 1},
]


@pytest.mark.parametrize("moe", ROUTERS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()) or "default")
def test_outputs_unchanged_and_counts_match_the_layers(moe):
    model = tiny_model(**moe)
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
    rec = RoutingRecorder(model)
    out = rec.update(x)
    assert torch.equal(out.logits, plain.logits)
    assert torch.equal(out.aux_loss, plain.aux_loss)
    with torch.no_grad():
        again = model(x)
    assert all(aux.routing is None for aux in again.moe_aux)  # the hooks are gone
    agg = rec.aggregates()
    for layer, aux in zip(agg.layers, plain.moe_aux):
        assert torch.equal(layer.processed, aux.tokens_per_expert)
        assert layer.tokens == 60
        assert layer.dropped_tokens == int(aux.dropped_tokens)
    summary = stats.summarize(agg)
    assert len(summary["layers"]) == 2 and len(summary["transitions"]) == 1


def test_streaming_equals_one_shot():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (2, 24), generator=g) for _ in range(3)]
    labels = [torch.randint(0, 3, (2, 24), generator=g) for _ in range(3)]
    streamed = RoutingRecorder(model, label_names=["a", "b", "c"])
    for x, y in zip(batches, labels):
        streamed.update(x, y)
    once = RoutingRecorder(model, label_names=["a", "b", "c"])
    once.update(torch.cat(batches), torch.cat(labels))
    a, b = streamed.aggregates(), once.aggregates()
    for la, lb in zip(a.layers, b.layers):
        for name in ("routed", "processed", "top1", "coactivation", "entropy_hist", "label_tokens", "label_routed"):
            assert torch.equal(getattr(la, name), getattr(lb, name)), name
        assert torch.allclose(la.weight_sum, lb.weight_sum)
        assert la.entropy_sum == pytest.approx(lb.entropy_sum)
        assert la.tokens == lb.tokens == 144
    for ta, tb in zip(a.transitions, b.transitions):
        assert torch.equal(ta, tb)
    # ... and both agree with the plain per-layer loads of expert_load().
    _, load = expert_load(model, batches)
    assert torch.equal(torch.stack([layer.routed for layer in a.layers]), load)


def test_padding_is_not_counted():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    rec = RoutingRecorder(model)
    rec.update(x, attention_mask=mask)
    assert rec.aggregates().layers[0].tokens == 16
    assert int(rec.aggregates().layers[0].routed.sum()) == 16 * 2


def test_per_sequence_labels():
    model = tiny_model()
    rec = RoutingRecorder(model, label_names=["first", "second"])
    rec.update(torch.randint(0, 256, (2, 8)), torch.tensor([0, 1]))
    assert rec.aggregates().layers[0].label_tokens.tolist() == [8, 8]


def test_raw_traces_round_trip(tmp_path):
    model = tiny_model()
    rec = RoutingRecorder(model, label_names=["a", "b"], trace_dir=tmp_path / "traces", trace_shard_tokens=30)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, 256, (2, 12), generator=g) for _ in range(3)]
    for i, x in enumerate(xs):
        rec.update(x, torch.full((2, 12), i % 2))
    index_file = rec.close()
    index, t = read_traces(index_file.parent)
    assert index["format"] == "moekit-routing-trace" and index["tokens"] == 72 and len(index["shards"]) >= 2
    assert t["experts"].shape == (72, 2, 2) and t["experts"].dtype == torch.int16
    assert t["weights"].dtype == torch.float16
    assert torch.equal(t["token_ids"], torch.cat([x.reshape(-1) for x in xs]).int())
    assert t["sequence"].tolist()[:13] == [0] * 12 + [1]
    assert t["labels"].tolist()[:24] == [0] * 24
    for n, layer in enumerate(rec.aggregates().layers):
        top1 = t["experts"][:, n, 0].long()
        assert torch.equal(torch.bincount(top1, minlength=4), layer.top1)
        assert torch.equal(torch.bincount(t["experts"][:, n].reshape(-1).long(), minlength=4), layer.routed)


def test_drift_is_zero_for_identical_checkpoints_and_not_otherwise():
    a, same, other = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=5)
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    ra, rs, ro = RoutingRecorder(a), RoutingRecorder(same), RoutingRecorder(other)
    d_same, d_other = DriftMeter(2), DriftMeter(2)
    ra.update(x)
    rs.update(x)
    d_same.add(ra.last, rs.last)
    ro.update(x)
    d_other.add(ra.last, ro.last)
    for d in stats.drift_summary(ra.aggregates(), rs.aggregates(), d_same):
        assert d["top1_changed"] == 0.0 and d["load_tv"] == 0.0 and d["topk_overlap"] == 1.0
    changed = stats.drift_summary(ra.aggregates(), ro.aggregates(), d_other)
    assert all(d["top1_changed"] > 0.2 for d in changed)


class Wrapped(torch.nn.Module):
    """Not an MoELM: an embedding and one MoE called positionally."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.block = torch.nn.ModuleDict({"ffn": MoE(hidden_size=16, num_experts=4, top_k=2, expert_hidden_size=16)})

    def forward(self, ids):
        y, _ = self.block["ffn"](self.embed(ids), None, None, False)
        return y


def test_any_module_holding_moe_layers():
    model = Wrapped().eval()
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        plain = model(x)
    rec = RoutingRecorder(model)
    assert torch.equal(rec.update(x), plain)
    assert int(rec.aggregates().layers[0].routed.sum()) == 20
    assert [name for _, name, _ in find_moe_layers(model)] == ["block.ffn"]


def test_a_model_without_moe_is_refused():
    with pytest.raises(ConfigError, match="no moekit MoE layer"):
        RoutingRecorder(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError), capture_routing(torch.nn.Linear(2, 2)):
        pass


def test_token_routes_cover_texts_longer_than_the_context():
    from moekit.data.tokenizers import ByteTokenizer

    model, tok = tiny_model(), ByteTokenizer()
    text = "Routing: which expert took which token? 0123456789 " * 4  # 204 bytes, context 64
    view = tokens.token_routes(model, tok, text, max_tokens=150)
    assert view["window"] == 64 and len(view["tokens"]) == len(view["experts"]) == 150
    assert "".join(view["tokens"]) == text[:150]
    assert all(len(per_layer) == 2 and len(per_layer[0]) == 2 for per_layer in view["experts"])
    rec = RoutingRecorder(model)
    rec.update(torch.tensor([tok.encode(text)[64:128]]))
    assert [t[1][0] for t in view["experts"][64:128]] == rec.last[1].top1_T.tolist()
