"""The MoE layer's CPU fast paths against their oracles.

* :func:`moekit.nn.kernels.fused_experts.moe_experts` (gather + experts + combine + fused shared experts, with a
  hand-written backward) against :func:`moekit.nn.moe.reference_moe` and plain autograd;
* :func:`moekit.nn.kernels.schedule.run_jobs` (single-threaded expert workers, or inline) against a plain
  loop, and its two schedules against each other, bit for bit;
* the worker path of :func:`moekit.nn.kernels.grouped_mm.grouped_mm` against ``grouped_mm_reference``;
* the half-precision GEMM policy (:func:`moekit.nn.kernels.grouped_mm.compute_dtype`).

Worker threads are forced on (``threads=3``) whatever the machine's core count; tests about one
schedule force it with ``expert_schedule``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from moekit.errors import ConfigError
from moekit.nn import MoE, reference_moe
from moekit.nn.dispatch import dispatch
from moekit.nn.experts import activate, expert_dropout_mask
from moekit.nn.kernels.fused_experts import moe_experts
from moekit.nn.kernels.grouped_mm import compute_dtype, grouped_mm, grouped_mm_reference
from moekit.nn.kernels.schedule import _ScheduleChooser, expert_schedule, intra_op_threads, run_jobs
from tests.nn.helpers import grads_of, make_layer

TOL = 1e-5


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def close(a, b, tol=TOL):
    """Equal up to fp32 rounding: absolute tol on values of order one, relative beyond."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def assert_layer_matches_reference(layer, x, mask=None, token_ids=None, tol=TOL):
    torch.manual_seed(123)
    upstream = torch.randn(x.shape, dtype=x.dtype)
    y_fast, g_fast = grads_of(layer, x, lambda t: layer(t, mask=mask, token_ids=token_ids)[0], upstream)
    y_ref, g_ref = grads_of(layer, x, lambda t: reference_moe(layer, t, mask=mask, token_ids=token_ids), upstream)
    assert close(y_fast.float(), y_ref.float(), tol)
    for name in g_ref:
        assert close(g_fast[name].float(), g_ref[name].float(), tol), name


# -- the fused layer path -----------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(activation="gelu"),
        dict(num_shared_experts=2, shared_expert_gate=True),
        dict(num_shared_experts=1, activation="gelu"),
        dict(capacity_factor=0.5),
        dict(router="expert_choice"),
        dict(router="dense", num_shared_experts=1),
        dict(num_experts=16, top_k=1),  # many empty experts
    ],
    ids=["swiglu", "gelu", "shared+gate", "shared-gelu", "capacity", "expert-choice", "dense-router", "empty"],
)
def test_layer_equals_reference(fields, workers):
    fields = dict(fields)
    layer = make_layer(fields.pop("router", "softmax_topk"), **fields)
    x = torch.randn(3, 11, 12)
    with threads(workers):
        assert_layer_matches_reference(layer, x)
        assert_layer_matches_reference(layer, x, mask=torch.rand(3, 11) > 0.3)
        assert torch.get_num_threads() == workers  # the layer leaves the caller's thread count alone


def test_worker_and_inline_paths_agree_bitwise():
    layer = make_layer("softmax_topk", num_experts=8, top_k=3, num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(64, 12)
    upstream = torch.randn(64, 12)
    with threads(1):
        y1, g1 = grads_of(layer, x, lambda t: layer(t)[0], upstream)
    with threads(3):
        y3, g3 = grads_of(layer, x, lambda t: layer(t)[0], upstream)
        y3b, g3b = grads_of(layer, x, lambda t: layer(t)[0], upstream)
    assert torch.equal(y3, y3b) and all(torch.equal(g3[k], g3b[k]) for k in g3)  # deterministic
    assert close(y1, y3) and all(close(g1[k], g3[k]) for k in g1)


def test_inference_and_no_grad_match_training_forward():
    layer = make_layer("softmax_topk", num_shared_experts=1)
    x = torch.randn(40, 12)
    with threads(3):
        y_train = layer(x)[0]
        with torch.no_grad():
            y_nograd = layer(x)[0]
        with torch.inference_mode():
            y_inf = layer(x)[0]
    assert torch.equal(y_train.detach(), y_nograd) and torch.equal(y_nograd, y_inf)


def test_shared_mlp_with_a_hook_runs_as_a_module():
    layer = make_layer("softmax_topk", num_shared_experts=1)
    seen = []
    layer.shared_experts.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(20, 12)
    assert_layer_matches_reference(layer, x)
    assert seen, "the hooked shared MLP was bypassed"


def test_moe_experts_gradcheck_float64():
    torch.manual_seed(0)
    T, D, E, H, S = 7, 5, 3, 4, 6
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(E, D, 2 * H, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(E, H, D, dtype=torch.float64, requires_grad=True)
    sw_in = torch.randn(D, 2 * S, dtype=torch.float64, requires_grad=True)
    sw_out = torch.randn(S, D, dtype=torch.float64, requires_grad=True)
    sweight = torch.rand(T, dtype=torch.float64, requires_grad=True)
    token_idx = torch.tensor([0, 3, 5, 1, 1, 2, 6, 4, 0])  # token 1 twice on expert 1, expert 2 empty
    counts = (3, 6, 0)
    weight = torch.rand(9, dtype=torch.float64, requires_grad=True)

    def f(x, weight, w_in, w_out, sw_in, sw_out, sweight):
        return moe_experts(x, token_idx, weight, counts, w_in, w_out, "swiglu", sw_in, sw_out, sweight, threads=3)

    assert torch.autograd.gradcheck(f, (x, weight, w_in, w_out, sw_in, sw_out, sweight))


@pytest.mark.parametrize("schedule", ["workers", "inline"])
@pytest.mark.parametrize("workers", [1, 3])
def test_moe_experts_equals_plain_autograd(workers, schedule):
    torch.manual_seed(1)
    layer = make_layer("softmax_topk", num_experts=5, top_k=2)
    x = torch.randn(30, 12, requires_grad=True)
    routing = layer.route(x)
    plan = dispatch(routing, 5)
    ex = layer.experts

    def plain():
        out = ex(x[plan.token_idx_N], plan.counts) * plan.weight_N.unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, plan.token_idx_N, out)

    def fused():
        return moe_experts(x, plan.token_idx_N, plan.weight_N, plan.counts, ex.w_in, ex.w_out, threads=workers)

    g = torch.randn(30, 12)
    params = (x, ex.w_in, ex.w_out, layer.router.weight)
    ref = torch.autograd.grad((plain() * g).sum(), params, retain_graph=True)
    with expert_schedule(schedule):
        got = torch.autograd.grad((fused() * g).sum(), params)
    for a, b in zip(got, ref):
        assert close(a, b)


# -- expert dropout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_experts_with_a_dropout_mask_gradcheck_float64(activation):
    torch.manual_seed(0)
    T, D, E, H = 7, 5, 3, 4
    width = 2 * H if activation == "swiglu" else H
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(E, D, width, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(E, H, D, dtype=torch.float64, requires_grad=True)
    token_idx = torch.tensor([0, 3, 5, 1, 1, 2, 6, 4, 0])
    counts = (3, 6, 0)
    weight = torch.rand(9, dtype=torch.float64, requires_grad=True)
    mask = expert_dropout_mask(9, H, 0.5, dtype=torch.float64)
    assert (mask == 0).any() and (mask == 2).any()

    def f(x, weight, w_in, w_out):
        return moe_experts(x, token_idx, weight, counts, w_in, w_out, activation, threads=3, dropout_mask_NH=mask)

    assert torch.autograd.gradcheck(f, (x, weight, w_in, w_out))


@pytest.mark.parametrize("workers", [1, 3])
def test_moe_experts_dropout_mask_equals_plain_autograd(workers):
    torch.manual_seed(2)
    layer = make_layer("softmax_topk", num_experts=5, top_k=2, num_shared_experts=1)
    x = torch.randn(30, 12, requires_grad=True)
    plan = dispatch(layer.route(x), 5)
    ex, shared = layer.experts, layer._fusable_shared(x)
    mask = expert_dropout_mask(plan.token_idx_N.shape[0], ex.expert_hidden_size, 0.3)

    def plain():  # the masked hidden activations by hand; the shared expert is not masked
        a = activate(grouped_mm_reference(x[plan.token_idx_N], ex.w_in, plan.counts), ex.activation) * mask
        out = grouped_mm_reference(a, ex.w_out, plan.counts) * plan.weight_N.unsqueeze(-1)
        return layer.shared_output(x).index_add(0, plan.token_idx_N, out)

    def fused():
        return moe_experts(
            x,
            plan.token_idx_N,
            plan.weight_N,
            plan.counts,
            ex.w_in,
            ex.w_out,
            ex.activation,
            *shared,
            threads=workers,
            dropout_mask_NH=mask,
        )

    g = torch.randn(30, 12)
    params = (x, ex.w_in, ex.w_out, layer.router.weight, *layer.shared_experts.parameters())
    ref = torch.autograd.grad((plain() * g).sum(), params, retain_graph=True)
    got = torch.autograd.grad((fused() * g).sum(), params)
    for a, b in zip(got, ref):
        assert close(a, b)


def test_expert_dropout_is_training_only_and_unbiased():
    layer = make_layer("softmax_topk", expert_dropout=0.5, aux_loss_coef=0.0, z_loss_coef=0.0, seq_aux_loss_coef=0.0)
    x = torch.randn(16, 12)
    with torch.no_grad():
        layer.eval()
        y_eval = layer(x)[0]
        assert close(y_eval, reference_moe(layer, x))
        layer.train()
        samples = torch.stack([layer(x)[0] for _ in range(4000)])
    assert not torch.allclose(samples[0], y_eval, atol=1e-3)  # dropout acts in training
    # Inverted dropout: the training output is the eval output on average (mean of 4000 draws).
    spread = samples.std(0) / 4000**0.5
    assert ((samples.mean(0) - y_eval).abs() <= 5 * spread + 1e-6).all()


def test_experts_module_dropout_matches_the_fused_mask_semantics():
    layer = make_layer("softmax_topk")
    x = torch.randn(20, 12)
    plan = dispatch(layer.route(x), layer.config.num_experts)
    x_N = x[plan.token_idx_N]
    ex = layer.experts
    with torch.no_grad():
        assert torch.equal(ex(x_N, plan.counts, 0.0), ex(x_N, plan.counts))
        torch.manual_seed(5)
        dropped = ex(x_N, plan.counts, 0.4)
        torch.manual_seed(5)  # F.dropout draws the same keep pattern as an explicit mask times the activation
        a = activate(grouped_mm_reference(x_N, ex.w_in, plan.counts), ex.activation)
        by_hand = grouped_mm_reference(F.dropout(a, 0.4), ex.w_out, plan.counts)
    assert close(dropped, by_hand)


# -- half precision -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layer_close_to_reference(dtype):
    layer = make_layer("softmax_topk", num_shared_experts=1, shared_expert_gate=True).to(dtype)
    x = torch.randn(2, 9, 12, dtype=dtype)
    with threads(3):
        assert_layer_matches_reference(layer, x, tol=3e-2)
        y, _ = layer(x)
    assert y.dtype == dtype


def test_autocast_layer_close_to_reference():
    layer = make_layer("softmax_topk", num_shared_experts=1)
    x = torch.randn(2, 9, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
        ref = reference_moe(layer, x)
    assert close(y.float(), ref.float(), 3e-2)


def test_compute_dtype_policy():
    cpu = torch.device("cpu")
    assert compute_dtype(torch.float32, cpu) == torch.float32
    assert compute_dtype(torch.float64, cpu) == torch.float64
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert compute_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_widened_bf16_gemm_is_a_bf16_gemm_with_fp32_accumulation():
    a = torch.randn(17, 33).bfloat16()
    b = torch.randn(33, 9).bfloat16()
    exact = a.double() @ b.double()
    widened = (a.float() @ b.float()).bfloat16()
    # The widened result is the exact product rounded once to bf16 (up to fp32 summation error).
    assert (widened.double() - exact).abs().max() <= exact.abs().max() * 2**-8


# -- grouped GEMM on workers --------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [(3, 0, 5, 1), (0, 0, 0, 7), (4, 4, 4, 4, 4)])
def test_grouped_mm_on_workers_matches_reference(counts):
    E = len(counts)
    x = torch.randn(sum(counts), 6, requires_grad=True)
    w = torch.randn(E, 6, 5, requires_grad=True)
    g = torch.randn(sum(counts), 5)
    with threads(3):
        y = grouped_mm(x, w, counts)
        gx, gw = torch.autograd.grad((y * g).sum(), (x, w))
    y_ref = grouped_mm_reference(x, w, counts)
    gx_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), (x, w))
    assert close(y, y_ref) and close(gx, gx_ref) and close(gw, gw_ref)
    assert torch.all(gw[[e for e, n in enumerate(counts) if n == 0]] == 0)


def test_grouped_mm_bf16_close_to_reference():
    counts = (3, 2, 5)
    x = torch.randn(10, 8).bfloat16()
    w = torch.randn(3, 8, 4).bfloat16()
    ref = grouped_mm_reference(x.double(), w.double(), counts)
    with threads(3):
        assert close(grouped_mm(x, w, counts).double(), ref, 1e-2)


# -- the worker pool ------------------------------------------------------------------------------------
def test_run_jobs_runs_every_job_once_on_workers():
    seen, names = [], set()
    lock = threading.Lock()

    def job(j):
        with lock:
            seen.append(j)
            names.add(threading.current_thread().name)
        assert torch.get_num_threads() == 1  # workers use one intra-op thread

    before = torch.get_num_threads()
    with expert_schedule("workers"):
        run_jobs(job, list(range(20)), torch.device("cpu"), cost=list(range(20)), threads=3)
    assert sorted(seen) == list(range(20))
    assert all(n.startswith("moekit-expert") for n in names)
    assert torch.get_num_threads() == before


def test_run_jobs_inline_with_one_thread_and_few_jobs():
    names = []
    run_jobs(lambda j: names.append(threading.current_thread().name), [0, 1], torch.device("cpu"), threads=3)
    run_jobs(lambda j: names.append(threading.current_thread().name), [0, 1, 2], torch.device("cpu"), threads=1)
    assert set(names) == {threading.current_thread().name}


def test_run_jobs_reraises_and_keeps_modes():
    def boom(j):
        if j == 5:
            raise ValueError("job 5")

    modes = []
    cpu = torch.device("cpu")
    for schedule in ("workers", "inline"):
        with expert_schedule(schedule):
            with pytest.raises(ValueError, match="job 5"):
                run_jobs(boom, list(range(10)), cpu, threads=3)
            with torch.inference_mode():
                run_jobs(lambda j: modes.append(torch.is_inference_mode_enabled()), [0, 1, 2], cpu, threads=3)
            with torch.no_grad():
                run_jobs(lambda j: modes.append(not torch.is_grad_enabled()), [0, 1, 2], cpu, threads=3)
    assert all(modes) and len(modes) == 12


def test_run_jobs_inline_runs_on_the_caller_with_its_threads():
    seen = []

    def job(j):
        seen.append((j, threading.current_thread().name, torch.get_num_threads()))

    before = torch.get_num_threads()
    with expert_schedule("inline"):
        run_jobs(job, [0, 1, 2, 3], torch.device("cpu"), threads=3, worker_jobs=[9], worker_cost=[1])
    assert seen == [(j, threading.current_thread().name, 3) for j in range(4)]  # `jobs`, not `worker_jobs`
    assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="expert schedule must be one of inline, workers, auto; got 'fastest'"):
        with expert_schedule("fastest"):
            pass


def test_a_bad_schedule_in_the_environment_is_refused_at_import():
    env = {**os.environ, "MOEKIT_EXPERT_SCHEDULE": "fastest"}
    done = subprocess.run([sys.executable, "-c", "import moekit.nn"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "MOEKIT_EXPERT_SCHEDULE must be one of inline, workers, auto; got 'fastest'" in done.stderr


def test_schedule_chooser_runs_the_faster_and_retries_the_other():
    chooser = _ScheduleChooser()
    site = "site"
    assert chooser.choose(site) == "workers"  # each is measured once first
    chooser.record(site, "workers", 2.0)
    assert chooser.choose(site) == "inline"
    chooser.record(site, "inline", 1.0)
    picks = [chooser.choose(site) for _ in range(3 * chooser.EXPLORE_EVERY)]
    assert picks.count("workers") == 3 and picks.count("inline") == 3 * chooser.EXPLORE_EVERY - 3
    # The machine gets busy: inline slows down, and the moving average moves the site to the workers.
    for _ in range(10):
        chooser.record(site, "inline", 5.0)
    assert chooser.choose(site) == "workers"
    assert chooser.choose("another site") == "workers"  # sites are measured apart


def test_auto_schedule_measures_each_call_site():
    def job(j):
        pass

    with expert_schedule("auto"):
        for _ in range(3):
            run_jobs(job, [0, 1, 2], torch.device("cpu"), cost=[1, 2, 3], threads=3)
    from moekit.nn.kernels.schedule import _CHOOSER

    state = _CHOOSER.sites[job.__code__]
    assert state["calls"] == 3 and state["workers"] > 0 and state["inline"] > 0


def test_schedules_agree_and_inline_is_the_deterministic_default():
    """Both schedules compute the same function (to rounding: MKL may round differently on 1 and N threads),
    including experts of 5-11 rows; the default schedule, inline, repeats its bits."""
    torch.manual_seed(5)
    D, H = 24, 40
    counts = (300, 5, 7, 0, 11, 32, 9, 200)
    E, N, T = len(counts), sum(counts), 400
    x = torch.randn(T, D, requires_grad=True)
    token_idx = torch.randint(0, T, (N,))
    weight = torch.rand(N, requires_grad=True)
    w_in = torch.randn(E, D, 2 * H, requires_grad=True)
    w_out = torch.randn(E, H, D, requires_grad=True)
    x_N = torch.randn(N, D, requires_grad=True)
    g_T, g_N = torch.randn(T, D), torch.randn(N, 2 * H)

    def run():
        y = moe_experts(x, token_idx, weight, counts, w_in, w_out, "swiglu", threads=2)
        grads = torch.autograd.grad(y, (x, weight, w_in, w_out), g_T)
        z = grouped_mm(x_N, w_in, counts)
        return (y, *grads, z, *torch.autograd.grad(z, (x_N, w_in), g_N))

    with threads(2):
        default, again = run(), run()
        with expert_schedule("workers"):
            on_workers = run()
    for a, b, c in zip(default, again, on_workers):
        assert torch.equal(a, b)
        assert close(a, c, 1e-4)


def test_intra_op_threads_restores():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_layer_uses_workers_for_shared_and_routed_experts():
    """The layer's result is the same when the shared MLP runs fused (stock module) or as a module."""
    torch.manual_seed(3)
    layer = MoE(hidden_size=16, num_experts=6, top_k=2, expert_hidden_size=8, num_shared_experts=2)
    x = torch.randn(50, 16)
    with threads(3), torch.no_grad(), expert_schedule("workers"):
        fused = layer(x)[0]
        routing = layer.route(x)
        plan = dispatch(routing, 6)
        ex = layer.experts
        routed = moe_experts(x, plan.token_idx_N, plan.weight_N, plan.counts, ex.w_in, ex.w_out)
        m = layer.shared_experts
        shared = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    assert close(fused, routed + shared)


def test_few_large_experts_split_into_row_pieces_in_forward():
    """With fewer experts than 4 x workers the forward cuts experts into row pieces (backward does not)."""
    layer = make_layer("softmax_topk", num_experts=2, top_k=1)
    x = torch.randn(300, 12)
    _, aux = layer(x)
    assert aux.tokens_per_expert.max() > 64  # more rows than one piece
    with threads(3), expert_schedule("workers"):
        assert_layer_matches_reference(layer, x)
