"""Big MoE models on small machines: moekit vs transformers vs llama.cpp on the same random-weight checkpoint.

Each configuration runs in its own process, one after another in one sitting (the machine's other load is
printed with the results): load time, peak resident memory (VmHWM, less the process's size before
loading), prefill tokens/s (one forward of a 256-token prompt), and batch-1 / batch-8 decode tokens/s
((N - 1) new tokens / (T(N) - T(1)) after a 32-token prompt, median of repeats). Decoding is greedy.

Configurations (``--peers``, comma-separated):
  moekit-fp32, moekit-bf16            ``moekit.from_hf(DIR, dtype=...)``
  moekit-KIND                         a ``moekit quantize`` output (``--quantized-dir KIND=DIR``, e.g.
                                      int8, int4, mixed; int8-all / int4-all with ``--linear-bits 8``)
  moekit-bf16-offload                 bf16 with ``expert_memory=--expert-memory``
  moekit-...-aten                     that peer without moekit's native decode kernels (MOEKIT_NATIVE=0)
  transformers-bf16                   ``AutoModelForCausalLM.from_pretrained(DIR, dtype=bfloat16)``
  llamacpp-bf16, llamacpp-q8_0, llamacpp-q4_k_m   llama-cpp-python on ``--gguf KIND=FILE`` (its own
                                      interpreter: ``--llama-python``); batch-8 decode is not measured there

Make the checkpoint with ``benchmarks/make_big_checkpoint.py`` and the GGUF files with
``benchmarks/make_gguf.py``. Also printed: this machine's copy bandwidth (one and two threads) and, per
moekit configuration, the bytes a decode step reads and the GB/s that makes.

Usage:
    python benchmarks/big_model.py --model /tmp/q3-1.7b --peers moekit-bf16,transformers-bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT, PREFILL, NEW = 32, 256, 33


def _kib(key: str) -> int:
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])


def _decode_rates(generate, vocab: int, repeats: int, decode_only: bool = False) -> dict:
    """prefill tok/s and batch-1 / batch-8 decode tok/s of ``generate(ids [B, L], n) -> None`` (batch-1 decode
    only with ``decode_only``: the big shapes, whose int4 prompts take minutes)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    if not decode_only:
        long = torch.randint(3, vocab, (1, PREFILL), generator=g)
        generate(long, 1)
        out["prefill_tok_s"] = PREFILL / statistics.median(_timed(lambda: generate(long, 1)) for _ in range(repeats))
    for batch in (1,) if decode_only else (1, 8):
        ids = torch.randint(3, vocab, (batch, PROMPT), generator=g)
        generate(ids, 4)
        one = statistics.median(_timed(lambda ids=ids: generate(ids, 1)) for _ in range(repeats))
        many = statistics.median(_timed(lambda ids=ids: generate(ids, NEW)) for _ in range(repeats))
        out[f"decode_b{batch}_tok_s"] = batch * (NEW - 1) / max(many - one, 1e-9)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker_torch(args) -> dict:
    """One moekit or transformers configuration, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    kind = args.worker.removesuffix("-aten")
    if kind.startswith("transformers"):
        import transformers
    else:
        import moekit
        import moekit.checkpoint
        import moekit.interop.hf.api
        from moekit.inference.generate import generate as mk_generate
    before = _kib("VmRSS")  # imports are not loading: the clock and the memory count start here
    t0 = time.perf_counter()
    if kind.startswith("transformers"):
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()

        def generate(ids, n):
            with torch.inference_mode():
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip
    else:
        extra = {"expert_memory": args.expert_memory} if kind.endswith("offload") else {}
        if kind.split("-", 1)[1] in args.quantized:
            model = moekit.load(args.quantized[kind.split("-", 1)[1]], **extra)
        else:
            model = moekit.from_hf(args.model, dtype="float32" if kind == "moekit-fp32" else "bfloat16", **extra)

        def generate(ids, n):
            mk_generate(model, ids, max_new_tokens=n, temperature=0)

    load_s = time.perf_counter() - t0
    load_peak = _kib("VmHWM") - before
    rates = _decode_rates(generate, args.vocab, args.repeats, args.decode_only)
    result = {"peer": kind, "load_s": load_s, "load_peak_gb": load_peak * 1024 / 1e9}
    result["peak_gb"] = (_kib("VmHWM") - before) * 1024 / 1e9
    result.update(rates)
    if not kind.startswith("transformers"):
        result["step_bytes"] = step_bytes(model)
    stats = getattr(model, "offload_stats", None)
    if stats is not None:
        result["offload"] = stats() if callable(stats) else stats
    return result


def step_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step of a moekit model reads, as stored (bf16, int8 or int4 with their
    scales): every tensor but the embedding and the experts, plus top-k experts' worth of each MoE layer."""
    from moekit.nn import MoE

    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".experts." not in name and "embed_tokens" not in name:
            total += t.numel() * t.element_size()
    tied = model.config.tie_word_embeddings
    total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size() if tied else 0
    for layer in model.modules():
        if isinstance(layer, MoE):
            experts = layer.experts
            held = sum(t.numel() * t.element_size() for t in [*experts.parameters(), *experts.buffers()])
            total += held * layer.config.top_k // layer.config.num_experts
    return total


LLAMA_WORKER = r"""
import json, statistics, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, vocab, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def kib(key): return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
before = kib("VmRSS"); t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=256, verbose=False)
load_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
def run(prompt, n):
    llm.reset(); llm.eval(prompt)
    for _ in range(n - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t
long = rng.integers(3, vocab, 256).tolist(); run(long, 1)
prefill = 256 / statistics.median(timed(lambda: run(long, 1)) for _ in range(repeats))
ids = rng.integers(3, vocab, 32).tolist(); run(ids, 4)
one = statistics.median(timed(lambda: run(ids, 1)) for _ in range(repeats))
many = statistics.median(timed(lambda: run(ids, 33)) for _ in range(repeats))
print(json.dumps({"load_s": load_s, "peak_gb": (kib("VmHWM") - before) * 1024 / 1e9, "prefill_tok_s": prefill,
                  "decode_b1_tok_s": 32 / (many - one)}))
"""


def copy_bandwidth() -> dict:
    """GB/s of copying 512 MiB (read + write counted), on one and on two threads."""
    import torch

    out = {}
    a = torch.ones(512 * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        b.copy_(a)
        t = min(_timed(lambda: b.copy_(a)) for _ in range(5))
        out[f"copy_gb_s_{threads}t"] = 2 * a.numel() / t / 1e9
    return out


def decode_bytes(model_dir: str) -> dict:
    """Bytes of bf16 weights one batch-1 decode step reads: attention, norms, router, top-k experts, head."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    attn = D * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    experts = cfg["num_experts_per_tok"] * 3 * D * cfg["moe_intermediate_size"]
    per_layer = attn + experts + cfg.get("num_experts", cfg.get("num_local_experts", 0)) * D
    return {"bf16_bytes_per_token": 2 * (L * per_layer + V * D)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint folder (make_big_checkpoint.py)")
    ap.add_argument("--peers", default="moekit-bf16,moekit-fp32,transformers-bf16")
    ap.add_argument("--quantized-dir", action="append", default=[], help="KIND=DIR: peer moekit-KIND loads DIR")
    ap.add_argument("--gguf", action="append", default=[], help="KIND=FILE with KIND bf16|q8_0|q4_k_m")
    ap.add_argument("--llama-python", default=os.environ.get("MOEKIT_LLAMA_PYTHON"))
    ap.add_argument("--expert-memory", default="1GiB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-only", action="store_true", help="batch-1 decode only (no 256-token prefill, no batch 8)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    args.quantized = dict(kv.split("=", 1) for kv in args.quantized_dir)
    if args.worker:
        print(json.dumps(worker_torch(args)))
        return 0
    gguf = dict(kv.split("=", 1) for kv in args.gguf)
    machine = {**copy_bandwidth(), **decode_bytes(args.model), "load_before": os.getloadavg()}
    print(f"# {args.model}: {machine}", flush=True)
    rows = []
    for peer in args.peers.split(","):
        if peer.startswith("llamacpp"):
            if not args.llama_python:
                raise SystemExit("llama.cpp peers need --llama-python (an interpreter with llama_cpp)")
            cmd = [args.llama_python, "-c", LLAMA_WORKER, gguf[peer.split("-", 1)[1]], str(args.threads)]
            cmd += [str(args.vocab), str(args.repeats)]
        else:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", peer]
        # a "-aten" suffix runs that moekit peer without its native decode kernels (MOEKIT_NATIVE=0)
        env = {**os.environ, "MOEKIT_NATIVE": "0"} if peer.endswith("-aten") else None
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{peer}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "peer": peer}
        step = row.get("step_bytes") or (machine["bf16_bytes_per_token"] if "bf16" in peer else None)
        row["decode_b1_gb_s"] = step * row["decode_b1_tok_s"] / 1e9 if step else None
        rows.append(row)
        print(
            f"{peer:22s} load {row['load_s']:6.2f} s  peak {row['peak_gb']:6.2f} GB  "
            f"prefill {row.get('prefill_tok_s', float('nan')):7.1f}  decode b1 {row['decode_b1_tok_s']:6.1f}  "
            f"b8 {row.get('decode_b8_tok_s', float('nan')):6.1f} tok/s  "
            f"({row['decode_b1_gb_s'] or float('nan'):.1f} GB/s at b1)",
            flush=True,
        )
    machine["load_after"] = os.getloadavg()
    base = next((r for r in rows if r["peer"] == "transformers-bf16"), None)
    if base:
        for r in rows:
            r["decode_b1_vs_transformers"] = r["decode_b1_tok_s"] / base["decode_b1_tok_s"]
    print(f"# load average after: {machine['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
