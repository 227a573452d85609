"""Worker processes of the distributed tests: ``python -m tests.distributed.workers CASE OUT_DIR [ARGS]``.

Started by :func:`moekit.distributed.launch.launch` (RANK / WORLD_SIZE / MASTER_* in the environment).
Each rank computes the single-process reference on the whole global batch itself (same seed, same
model), runs the distributed version on its slice, and writes the largest differences to
``OUT_DIR/CASE-rank{r}.json``; the test process asserts on them.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from moekit.distributed import (  # noqa: E402
    DistributedError,
    DistributedTrainer,
    clip_grad_norm_,
    expert_parameters,
    init_distributed,
    run_guarded,
    shard_model,
    train_distributed,
)
from moekit.models import MoELM  # noqa: E402
from moekit.models.presets import TINY  # noqa: E402
from moekit.nn import MoE, start_global_batch  # noqa: E402
from moekit.train import TrainConfig  # noqa: E402

VOCAB = 64
BASE = TINY.replace(vocab_size=VOCAB, max_position_embeddings=16)


def lm_config(router="softmax_topk", experts=4, **moe):
    defaults = dict(aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.01)
    if router == "sigmoid_topk":
        defaults.update(bias_update_rate=0.01)
    return BASE.replace(moe=BASE.moe.replace(router=router, num_experts=experts, **{**defaults, **moe}))


def _is_expert(p, model) -> bool:
    return any(p is q for q in expert_parameters(model))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to max(1, |b|): fp32 losses of magnitude ~1000 (z-loss of saturated routers) round at 1e-4."""
    return _max_err(a, b) / max(1.0, float(b.detach().abs().max()))


def _lm_loss(model, x):
    out = model(x)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    return out, ce


def compare_lm(ctx, config, batch=8, seq=12, skew=None, steps=1, max_norm=0.05, seed=0) -> dict:
    """Forward, losses, every gradient, clipping and ``steps`` AdamW steps (+ bias updates) vs one process."""
    torch.manual_seed(seed)
    ref = MoELM(config).train()
    for _, moe in ref.moe_layers():
        if skew is not None:  # make every token pick the experts in `skew`
            with torch.no_grad():
                favour = torch.full((config.moe.num_experts,), -30.0)
                favour[list(skew)] = 30.0
                if moe.router.bias is not None:
                    moe.router.bias.copy_(favour)
                else:
                    moe.router.e_score_correction_bias.copy_(favour)
    model = shard_model(copy.deepcopy(ref), ctx)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    W, r, P = ctx.world_size, ctx.rank, ctx.ep_size
    b = batch // W
    errs: dict[str, float] = {}

    def note(key, value):
        errs[key] = max(errs.get(key, 0.0), value)

    g = torch.Generator().manual_seed(seed + 1)
    received = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out_ref, ce_ref = _lm_loss(ref, x)
        (ce_ref + out_ref.aux_loss).backward()
        out, ce = _lm_loss(model, x[r * b : (r + 1) * b])
        (ce + out.aux_loss).backward()
        note("logits", _max_err(out.logits, out_ref.logits[r * b : (r + 1) * b]))
        note("ce", abs(ctx.all_reduce_mean(ce.item()) - ce_ref.item()))
        note("aux_loss", _rel_err(out.aux_loss, out_ref.aux_loss))
        for a, a_ref in zip(out.moe_aux, out_ref.moe_aux):
            for name in a_ref.losses:
                note(f"loss:{name}", _rel_err(a.losses[name], a_ref.losses[name]))
            note("tokens_per_expert", _max_err(a.tokens_per_expert, a_ref.tokens_per_expert))
            if a_ref.zero_computation_load is not None:  # MoE++: the zero-computation experts' load, FFN skips
                note("zero_computation_load", _max_err(a.zero_computation_load, a_ref.zero_computation_load))
                note("ffn_skipped_tokens", _max_err(a.ffn_skipped_tokens, a_ref.ffn_skipped_tokens))
            note("router_entropy", _max_err(a.router_entropy, a_ref.router_entropy))
            El = config.moe.num_experts // P
            received.append(int(a_ref.tokens_per_expert[ctx.ep_rank * El : (ctx.ep_rank + 1) * El].sum()))
        norm = clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], max_norm, expert_parameters(model), ctx
        )
        norm_ref = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], max_norm)
        note("grad_norm", abs(float(norm) - float(norm_ref)) / float(norm_ref))
        ref_params = dict(ref.named_parameters())
        checked = 0
        for name, p in model.named_parameters():
            p_ref = ref_params[name]
            grad_ref, value_ref = p_ref.grad, p_ref.detach()
            if _is_expert(p, model):
                n = p.shape[0]
                grad_ref = grad_ref[ctx.ep_rank * n : (ctx.ep_rank + 1) * n]
                value_ref = value_ref[ctx.ep_rank * n : (ctx.ep_rank + 1) * n]
            note("grad", _max_err(p.grad, grad_ref))
            note("param_before_step", _max_err(p, value_ref))
            checked += 1
        note("params_checked", float(checked == len(ref_params)))
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        model.update_router_biases()
        ref.update_router_biases()
        for (_, m), (_, m_ref) in zip(model.moe_layers(), ref.moe_layers()):
            if hasattr(m.router, "e_score_correction_bias"):
                bias, bias_ref = m.router.e_score_correction_bias, m_ref.router.e_score_correction_bias
                note("router_bias_update", _max_err(bias, bias_ref))
            if hasattr(m.router, "l1_coef"):  # relu: the L1 coefficient adapted to the global batch's sparsity
                note("relu_l1_coef_update", abs(float(m.router.l1_coef) / float(m_ref.router.l1_coef) - 1))
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        value_ref = ref_params[name].detach()
        if _is_expert(p, model):
            n = p.shape[0]
            value_ref = value_ref[ctx.ep_rank * n : (ctx.ep_rank + 1) * n]
        note("param_after_steps", _max_err(p, value_ref))
    errs["tokens_received_by_my_experts"] = float(sum(received))
    return errs


def compare_masked_layer(ctx, seed=0) -> dict:
    """One MoE layer with padding: every token of the last rank is masked, so it sends nothing."""
    torch.manual_seed(seed)
    layer = MoE(hidden_size=16, num_experts=4, top_k=2, expert_hidden_size=8, aux_loss_coef=0.01, z_loss_coef=0.01)
    dist_layer = shard_model(copy.deepcopy(layer), ctx)
    W, r = ctx.world_size, ctx.rank
    x = torch.randn(W * 2, 5, 16)
    mask = torch.ones(W * 2, 5, dtype=torch.bool)
    mask[-2:] = False
    mask[0, 3:] = False
    x_ref = x.clone().requires_grad_()
    y_ref, aux_ref = layer(x_ref, mask=mask)
    (y_ref.square().sum() + aux_ref.loss).backward()
    x_mine = x[2 * r : 2 * r + 2].clone().requires_grad_()
    y, aux = dist_layer(x_mine, mask=mask[2 * r : 2 * r + 2])
    # The summed loss of one process is split over ranks: rank r's part of sum(y^2), plus aux on every rank
    # (the gradients are averaged over W below, so the per-rank task loss is scaled by W).
    (W * y.square().sum() + aux.loss).backward()
    clip_grad_norm_(list(dist_layer.parameters()), float("inf"), expert_parameters(dist_layer), ctx)
    errs = {
        "output": _max_err(y, y_ref[2 * r : 2 * r + 2]),
        "aux_loss": _max_err(aux.loss, aux_ref.loss),
        "tokens_per_expert": _max_err(aux.tokens_per_expert, aux_ref.tokens_per_expert),
        "input_grad": _max_err(x_mine.grad * 1.0, x_ref.grad[2 * r : 2 * r + 2] * W),
    }
    ref_params = dict(layer.named_parameters())
    for name, p in dist_layer.named_parameters():
        grad_ref = ref_params[name].grad
        if _is_expert(p, dist_layer):
            n = p.shape[0]
            grad_ref = grad_ref[ctx.ep_rank * n : (ctx.ep_rank + 1) * n]
        errs[f"grad:{name}"] = _max_err(p.grad, grad_ref)
    return errs


def compare_checkpoint(ctx, checkpoint: str) -> dict:
    """A checkpoint (saved at any EP degree) loaded and sharded at this mesh's degree gives one process's logits."""
    from moekit.checkpoint import load_model

    model, _ = load_model(checkpoint)
    x = torch.randint(0, 256, (ctx.world_size * 2, 12), generator=torch.Generator().manual_seed(3))
    ref = model(x).logits
    sharded = shard_model(copy.deepcopy(model), ctx)
    r = ctx.rank
    with torch.no_grad():
        logits = sharded(x[2 * r : 2 * r + 2]).logits
    return {"logits": _max_err(logits, ref[2 * r : 2 * r + 2])}


def compare_global_batch(ctx, micro=2, batch=2, seq=12, seed=0) -> dict:
    """aux_loss_scope="global": each rank runs ``micro`` micro-batches of its share; then every layer's balancing
    window equals the aux loss of one process running the whole global batch at once."""
    torch.manual_seed(seed)
    ref = MoELM(lm_config(experts=4, aux_loss_scope="global")).train()
    model = shard_model(copy.deepcopy(ref), ctx)
    W, r = ctx.world_size, ctx.rank
    x = torch.randint(0, VOCAB, (W * micro * batch, seq), generator=torch.Generator().manual_seed(seed + 1))
    start_global_batch(ref)
    ref(x)
    start_global_batch(model)
    for m in range(micro):
        first = (m * W + r) * batch  # micro-batch m of rank r
        model(x[first : first + batch])
    errs = {}
    for (_, a), (_, a_ref) in zip(model.moe_layers(), ref.moe_layers()):
        got, want = a.balance_window_loss(), a_ref.balance_window_loss()
        errs["window_loss"] = max(errs.get("window_loss", 0.0), _rel_err(got, want))
    return errs


# -- cases ---------------------------------------------------------------------------------------------
def case_equivalence(out: Path, checkpoint: str | None = None) -> dict:
    results = {}
    W = int(os.environ["WORLD_SIZE"])
    ctx = init_distributed(ep=W, timeout=60)
    E = 4 if W <= 4 else W
    results["masked_layer"] = compare_masked_layer(ctx)
    if W == 2:
        results["softmax"] = compare_lm(ctx, lm_config(experts=E, router_bias=True), steps=2)
        results["global_batch_balance"] = compare_global_batch(ctx)
        results["expert_threshold"] = compare_lm(ctx, lm_config("expert_threshold", experts=E), steps=3)
        results["relu"] = compare_lm(ctx, lm_config("relu", experts=E, relu_l1_init=0.05), steps=2)
        moe_pp = dict(zero_experts=1, copy_experts=1, constant_experts=1, gating_residual=True)
        results["moe_pp_softmax"] = compare_lm(ctx, lm_config(experts=E, **moe_pp), steps=2)
        results["moe_pp_sigmoid"] = compare_lm(ctx, lm_config("sigmoid_topk", experts=E, **moe_pp), steps=2)
    results["skew_first_rank"] = compare_lm(ctx, lm_config(experts=E, router_bias=True), skew=(0, 1))
    results["skew_last_rank"] = compare_lm(ctx, lm_config(experts=E, router_bias=True), skew=(E - 2, E - 1))
    results["sigmoid_shared"] = compare_lm(
        ctx, lm_config("sigmoid_topk", experts=2 * E, num_shared_experts=1, n_group=2, topk_group=1), steps=2
    )
    if W == 4:
        ctx22 = init_distributed(ep=2, timeout=60)
        results["dp2_ep2"] = compare_lm(ctx22, lm_config(experts=4, router_bias=True), skew=(0, 1))
        results["dp2_ep2_sigmoid"] = compare_lm(ctx22, lm_config("sigmoid_topk", experts=4), steps=2)
    else:
        ctx21 = init_distributed(ep=1, timeout=60)
        results["dp2_ep1_sigmoid"] = compare_lm(ctx21, lm_config("sigmoid_topk", experts=4), steps=2)
        results["dp2_ep1_relu"] = compare_lm(ctx21, lm_config("relu", experts=4, relu_l1_init=0.05), steps=2)
    if checkpoint:
        for ep in sorted({1, 2, W}):
            results[f"checkpoint_ep{ep}"] = compare_checkpoint(init_distributed(ep=ep, timeout=60), checkpoint)
    ctx.close()
    return results


def _fast_train_config(out_dir: str, **kw) -> TrainConfig:
    corpus = Path(out_dir).parent / "corpus.txt"
    if not corpus.is_file():
        from moekit.data.corpus import builtin_corpus

        tmp = corpus.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(builtin_corpus()[:20_000])
        os.replace(tmp, corpus)  # both ranks write the same text; each rename is atomic
    return TrainConfig(
        model="tiny",
        data=str(corpus),
        batch_size=4,
        block_size=16,
        max_steps=4,
        eval_interval=100,
        eval_batches=1,
        log_interval=1,
        progress=False,
        tensorboard=False,
        out_dir=out_dir,
        **kw,
    )


def case_failures(out: Path) -> dict:
    """Configs that differ across ranks, then a rank that raises at step 2."""
    ctx = init_distributed(ep=2, timeout=20)
    results = {}
    lr = 1e-3 if ctx.rank == 0 else 2e-3
    try:
        train_distributed(_fast_train_config(str(out / "mismatch"), lr=lr), ctx=ctx)
        results["mismatch"] = "no error"
    except DistributedError as e:
        results["mismatch"] = str(e)
    ctx.store.delete_key(f"failed/{ctx.rank}")
    ctx.check_same("test barrier", {})

    class FailsAtStep2(DistributedTrainer):
        def train_step(self, progress):
            if self.step == 2 and self.ctx.rank == 1:
                raise RuntimeError("boom from the test")
            return super().train_step(progress)

    start = time.monotonic()
    try:
        run_guarded(ctx, lambda: FailsAtStep2(_fast_train_config(str(out / "raise")), ctx).run())
        results["raise"] = "no error"
    except DistributedError as e:
        results["raise"] = str(e)
    results["seconds_to_fail"] = time.monotonic() - start
    return results


def case_hang(out: Path) -> dict:
    """Rank 1 stops answering at step 2; rank 0 must fail within the timeout, not hang."""
    ctx = init_distributed(ep=2, timeout=4)

    class HangsAtStep2(DistributedTrainer):
        def train_step(self, progress):
            if self.step == 2 and self.ctx.rank == 1:
                time.sleep(120)
            return super().train_step(progress)

    start = time.monotonic()
    try:
        run_guarded(ctx, lambda: HangsAtStep2(_fast_train_config(str(out / "hang")), ctx).run())
        results = {"hang": "no error"}
    except DistributedError as e:
        results = {"hang": str(e)}
    results["seconds_to_fail"] = time.monotonic() - start
    return results


def case_time_budget(out: Path) -> dict:
    """Rank 1's clock reads 1000 s ahead; under a 2 s budget both ranks must still stop at rank 0's step."""
    ctx = init_distributed(ep=2, timeout=30)
    config = _fast_train_config(str(out / "budget")).replace(max_steps=100_000, time_budget=2.0)
    trainer = DistributedTrainer(config, ctx)
    if ctx.rank == 1:
        trainer.elapsed_before = 1000.0
    result = run_guarded(ctx, trainer.run)
    return {"step": result.step, "final_val_loss": result.val_losses[-1][1]}


CASES = {"equivalence": case_equivalence, "failures": case_failures, "hang": case_hang, "budget": case_time_budget}

if __name__ == "__main__":
    case, out_dir, *args = sys.argv[1:]
    out = Path(out_dir)
    rank = int(os.environ["RANK"])
    try:
        result = CASES[case](out, *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = {"exception": f"{type(exc).__name__}: {exc}"}
        (out / f"{case}-rank{rank}.json").write_text(json.dumps(result, indent=1))
        raise
    (out / f"{case}-rank{rank}.json").write_text(json.dumps(result, indent=1))
    sys.stdout.flush()
    # Leave at once (a rank that failed must not keep its peers waiting on a clean shutdown), with an
    # error code after a failure, as `moekit train` would: the launcher then stops the hung rank.
    os._exit(3 if case == "hang" else 0)
