"""moekit serve against ``transformers serve --continuous-batching`` and llama.cpp's server: the same checkpoint,
prompts and client.

A small random Qwen3-MoE (4 layers, hidden 256, 16 experts top-4) with a 2,000-token byte-level BPE and a ChatML
chat template is saved with ``save_pretrained``. Each server runs in its own process on 127.0.0.1 (one at a time,
so they never share the cores); the official ``openai`` client sends streamed chat completions (64 output tokens
each, greedy) from 1, 4 and 16 concurrent streams. Reported per server and concurrency: output tokens/s (all
streams' tokens over the wall time of the round) and p50/p99 time to first token. moekit serve uses its default
intra-op threads (all cores but one); transformers runs with its default and, as ``transformers-1t``, with
``OMP_NUM_THREADS=1``; ``llamacpp`` is llama-cpp-python's server (``--llama-python``: a venv with
``llama-cpp-python[server]``) on the checkpoint converted by llama.cpp's own converter to GGUF in the same dtype,
with ``--llama-threads`` threads (default: every core). That server answers one request at a time (the others
wait; its default of interrupting the running one is turned off).

Output tokens are counted from ``usage`` when the server sends it (``stream_options.include_usage``), else as
chunks that carry content (an empty one too: llama.cpp sends one per token, "" while a character is incomplete).
A random model may end early at its EOS token: the counts say what each server produced.

Needs ``accelerate`` beside transformers (``transformers serve`` loads with a device map).

Usage:
    python benchmarks/serve.py                       # writes benchmarks/results/serve.{md,json}
    python benchmarks/serve.py --quick               # fewer requests (smoke)
    python benchmarks/serve.py --model /work/bench/q3-1.7b --out benchmarks/results/serve_big
                                                     # a given HF folder (ChatML added if it has no template)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = (
    "Mixture-of-experts models route every token to a few experts. The router learns which experts suit which "
    "tokens, and a balancing loss keeps them all busy. Serving such a model means batching many requests. "
) * 200


def build_checkpoint(folder: Path) -> None:
    """The random Qwen3-MoE and its tokenizer, saved as transformers saves them."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=alphabet, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator([TEXT], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
        num_experts_per_tok=4, max_position_embeddings=2048, eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(hf_config).eval().save_pretrained(folder)


def linked(source: Path, folder: Path) -> None:
    """``folder``: links to ``source``'s files, with ChatML as the chat template where the tokenizer has none."""
    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item.resolve())
    config_file = source / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config.setdefault("chat_template", CHATML)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def given_checkpoint(source: Path, folder: Path) -> str:
    """:func:`linked`, and a one-line description of the model."""
    linked(source, folder)
    c = json.loads((source / "config.json").read_text())
    experts = c.get("num_experts", c.get("num_local_experts"))
    return (
        f"{source.name}: random {c['model_type']}, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"{experts} experts top-{c['num_experts_per_tok']}, vocab {c['vocab_size']}, {c.get('dtype', 'bf16')}"
    )


def to_gguf(folder: Path, tmp: Path, converter: str) -> str:
    """``folder`` as a GGUF file in its own dtype (fp32 or bf16), by llama.cpp's converter (make_gguf.py)."""
    dtype = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    outtype = "bf16" if "bfloat16" in str(dtype) else "f32"
    out = tmp / f"model-{outtype}.gguf"
    make_gguf = Path(__file__).with_name("make_gguf.py")
    cmd = [sys.executable, str(make_gguf), "--model", str(folder), "--converter", converter, "--one", outtype, str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def one_stream(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, output tokens) of one streamed chat completion."""
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content is not None:  # "" too: a token with no whole character
            if first is None and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            chunks += 1
    return (first if first is not None else time.perf_counter() - start), (usage if usage else chunks)


def measure(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    one_stream(client, model, "warm up", 8)
    prompts = [f"Request {i}: tell me about experts number {i % 7} and routing." for i in range(requests)]
    ttfts, tokens = [], []
    lock, queue = threading.Lock(), list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
            ttft, n = one_stream(client, model, prompt, max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    return {
        "concurrency": concurrency, "requests": requests, "output_tokens": sum(tokens), "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(tokens) / wall, 1), "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4),
    }  # fmt: skip


def serve_and_measure(name: str, cmd: list[str], url: str, model: str, args, env, ready: str = "/health") -> list[dict]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc, path=ready)
        rows = []
        for concurrency in args.concurrency:
            requests = max(args.requests, 2 * concurrency)
            row = {"server": name, **measure(url, model, concurrency, requests, args.max_tokens)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per round (at least 2x the concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    # transformers-1t: transformers serve with OMP_NUM_THREADS=1, as moekit serve uses on 2 cores (all but one);
    # moekit-Nt: moekit serve --threads N; moekit-1p: --single-process (the model in the server's process)
    p.add_argument("--servers", nargs="+", default=["moekit", "transformers", "transformers-1t"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve"))
    p.add_argument("--model", default=None, help="an HF model folder to serve instead of the small random one")
    # llamacpp: llama-cpp-python's server (`llama-cpp-python[server]`, in its own venv) on the same weights as GGUF
    p.add_argument("--llama-python", default=os.environ.get("MOEKIT_LLAMA_PYTHON"), help="python with llama_cpp")
    p.add_argument("--converter", default=os.environ.get("MOEKIT_LLAMA_CONVERTER"), help="convert_hf_to_gguf.py")
    p.add_argument("--gguf", default=None, help="the model as GGUF already (default: converted, same dtype)")
    p.add_argument("--llama-threads", type=int, default=os.cpu_count())
    # NAME=DIR: a moekit checkpoint (e.g. `moekit quantize` output) served as another row, with --threads 2
    p.add_argument("--checkpoints", nargs="*", default=[], metavar="NAME=DIR")
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency = 4, [1, 4]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOEKIT_API_KEY", None)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen3-moe-small"
        described = "random Qwen3-MoE: 4 layers, hidden 256, 16 experts top-4, 2,000-token byte-level BPE"
        if args.model:
            described = given_checkpoint(Path(args.model), folder)
        else:
            build_checkpoint(folder)
        extra = dict(item.split("=", 1) for item in args.checkpoints)
        for name, source in extra.items():
            linked(Path(source), Path(tmp) / name)
        for server in [*args.servers, *extra]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if server in extra:
                cmd = [sys.executable, "-m", "moekit", "serve", "--checkpoint", str(Path(tmp) / server), "--port",
                       str(port), "--served-model-name", "bench", "--max-batch", "16", "--threads", "2"]  # fmt: skip
                results += serve_and_measure(server, cmd, url, "bench", args, env)
            elif server.startswith("moekit"):
                cmd = [sys.executable, "-m", "moekit", "serve", "--model", str(folder), "--port", str(port),
                       "--served-model-name", "bench", "--max-batch", "16"]  # fmt: skip
                for flag in server.split("-")[1:]:  # moekit-2t: --threads 2; moekit-1p: --single-process
                    cmd += ["--threads", flag[:-1]] if flag.endswith("t") else ["--single-process"]
                results += serve_and_measure(server, cmd, url, "bench", args, env)
            elif server == "llamacpp":
                gguf = args.gguf or to_gguf(folder, Path(tmp), args.converter)
                cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                       "--port", str(port), "--model_alias", "bench", "--n_ctx", "2048", "--chat_format", "chatml",
                       "--n_threads", str(args.llama_threads), "--n_threads_batch", str(args.llama_threads),
                       "--interrupt_requests", "False"]  # fmt: skip  # queue, not cut, concurrent requests
                results += serve_and_measure(server, cmd, url, "bench", args, env, ready="/v1/models")
            else:
                exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
                cmd = [exe, "serve", "--continuous-batching", "--port", str(port), "--host", "127.0.0.1",
                       str(folder)]  # fmt: skip
                server_env = {**env, "OMP_NUM_THREADS": "1"} if server == "transformers-1t" else env
                results += serve_and_measure(server, cmd, url, str(folder), args, server_env)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },  # fmt: skip
        "model": described,
        "max_tokens": args.max_tokens,
        "results": results,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# moekit serve vs transformers serve --continuous-batching and llama.cpp's server", "",
             f"{report['model']}; {args.max_tokens} greedy streamed chat tokens per request, openai client.",
             f"Machine: {report['machine']['cpus']} CPUs, load average before {load_before[0]:.2f}, after "
             f"{report['machine']['load_after'][0]:.2f} (shared with other work). Written by benchmarks/serve.py.", "",
             "| server | streams | requests | output tokens | tokens/s | TTFT p50 (s) | TTFT p99 (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['output_tokens']} | "
                     f"{r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
