"""``moekit serve --checkpoint RUN | --model HF_DIR|FILE.gguf``: an OpenAI-compatible HTTP server with continuous
batching. The model is loaded as ``moekit generate`` loads it (``--dtype``, ``--expert-memory`` too).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics and a chat page
at /. It binds 127.0.0.1; another --host needs an API key (--api-key or MOEKIT_API_KEY), which every route but
/health and the page then checks.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from moekit.errors import ConfigError
from moekit.inference.model_options import add_model_options, load_model_of


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("serve", help="serve a model over the OpenAI HTTP API", description=__doc__)
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (not loopback: needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $MOEKIT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-n", type=int, default=4, help="largest n (choices per request)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for the model (default: all cores but one, which HTTP and clients use)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is ended")
    p.add_argument("--single-process", action="store_true",
                   help="run the model in the HTTP server's process (default on Linux: its own process)")  # fmt: skip
    p.set_defaults(func=run)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if api_key:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"--host {host} is reachable from other machines: set --api-key or MOEKIT_API_KEY first")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from moekit.serve.app import ServerOptions, build_app
    from moekit.serve.chat import ChatTemplate, end_token_ids
    from moekit.serve.engine import Engine
    from moekit.serve.remote import EngineProcess, can_fork

    api_key = args.api_key or os.environ.get("MOEKIT_API_KEY") or None
    check_bind(args.host, api_key)
    for name in ("max_batch", "max_queue", "max_tokens_limit", "max_body_bytes", "max_n", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    # Measured on 2 cores: with one intra-op thread the model no longer fights the HTTP side and the clients
    # for the cores, and serves 2-2.5x the tokens/s of two threads (benchmarks/results/serve.md).
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    fork = not args.single_process and can_fork()
    before = torch.get_num_threads()
    torch.set_num_threads(1 if fork else threads)  # a process forked after an OpenMP team hangs in its first one
    try:
        model, tokenizer = load_model_of(args)
    except BaseException:  # a bad --model, --dtype or --expert-memory changes nothing
        torch.set_num_threads(before)
        raise
    source = Path(args.checkpoint or args.model)
    # A GGUF file's tokenizer, EOS and chat template are in the folder its tokenizer was written to.
    folder = source if source.is_dir() else Path(tokenizer.path).parent
    options = ServerOptions(
        model_name=args.served_model_name or source.resolve().name,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        request_timeout_s=args.request_timeout,
        end_token_ids=end_token_ids(folder, tokenizer.eos_token_id),
    )
    if fork and can_fork():  # the load started no thread
        engine: Engine | EngineProcess = EngineProcess.fork(model, args.max_batch, args.max_queue,
                                                            tokenizer.vocab_size, threads)  # fmt: skip
    else:
        torch.set_num_threads(threads)
        engine = Engine(model, args.max_batch, args.max_queue, vocab_limit=tokenizer.vocab_size)
    app = build_app(engine, tokenizer, ChatTemplate.find(folder), options)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    # HTTP runs on a second thread; the main one runs the engine (see Engine.run) or, with the engine in its
    # own process, waits. The server's shutdown stops the engine; Ctrl-C or SIGTERM stop both.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True) or engine.stop())
    http = threading.Thread(target=server.run, name="moekit-http", daemon=True)
    http.start()
    while not server.started:  # a port in use ends the HTTP thread: say so rather than serve nothing
        if not http.is_alive():
            engine.stop()
            raise ConfigError(f"could not listen on {args.host}:{args.port} (in use, or not an address here)")
        time.sleep(0.05)
    where = "its own process" if isinstance(engine, EngineProcess) else "the server's process"
    print(f"moekit serve: {options.model_name} on http://{args.host}:{args.port} (model in {where})", file=sys.stderr)
    died = False
    try:
        if isinstance(engine, EngineProcess):
            while http.is_alive() and engine.alive:
                http.join(timeout=0.2)
            died = engine.died
        else:
            engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=30)
        engine.stop()
    if died:  # a supervisor should see it and restart the server, not find one that answers 503 forever
        print("moekit serve: the engine process ended unexpectedly; the server stops", file=sys.stderr)
        return 1
    return 0
