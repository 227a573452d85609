"""Continuous batching: one thread runs the model; requests join and leave the running batch between decode steps.

Each step the engine (1) ends requests that were cancelled (a client disconnected, a stop string matched) or ran
past their deadline, freeing their rows at once; (2) admits waiting requests up to ``max_batch``, encodes their
prompts in one left-padded forward and merges them into the running KV cache (:mod:`moekit.serve.rows`);
(3) decodes one token for every running row. A request never waits for the slowest one, and a greedy request
gets the tokens it would get alone: every row keeps its own positions and attends only to its own tokens.

Events reach the caller through the ``sink`` given with each request (called on the engine thread).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from moekit.analysis.capture import layer_routing
from moekit.errors import MoekitError
from moekit.models.lm import MoELM
from moekit.nn.attention import KVCache
from moekit.serve.rows import combine
from moekit.serve.sampling import Sampler, SamplingParams, TokenChoice

log = logging.getLogger(__name__)


class QueueFull(MoekitError):
    """The waiting queue is at its cap: the caller should retry later (HTTP 429)."""


class EngineStopped(MoekitError):
    """The engine is shutting down or has failed (HTTP 503)."""


@dataclasses.dataclass
class Finished:
    """The last event of a request: why it ended (``stop``, ``length``, ``cancelled``, ``timeout``, ``error``)."""

    reason: str
    message: str = ""


@dataclasses.dataclass
class PromptScores:
    """The prompt's tokens with their logprobs (sent before the first token when ``prompt_logprobs`` is set)."""

    tokens: list[TokenChoice]


Event = TokenChoice | PromptScores | Finished
Sink = Callable[[Event], None]


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt being served; :meth:`cancel` frees its row before the next step."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    generated: int = 0
    sampler: Sampler | None = None
    last_token: int = 0

    def cancel(self) -> None:
        """Ask the engine to drop this request (thread-safe; it ends with ``Finished('cancelled')``)."""
        self.cancelled = True

    @property
    def length(self) -> int:
        """Real tokens in the cache for this row (the prompt and every generated token fed back)."""
        return len(self.prompt) + self.generated - 1 if self.generated else len(self.prompt)


@dataclasses.dataclass
class EngineStats:
    """Counters the /metrics route reads (written by the engine thread only)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    running: int = 0
    # Per MoE layer, tokens routed to each expert (top-k assignments), over every forward.
    expert_tokens: dict[int, list[int]] = dataclasses.field(default_factory=dict)


class Engine:
    """Serves ``model`` (a :class:`moekit.models.MoELM`) on a background thread; see the module docstring."""

    def __init__(
        self,
        model: MoELM,
        max_batch: int = 16,
        max_queue: int = 64,
        vocab_limit: int | None = None,
    ):
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_limit = vocab_limit
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cache: KVCache | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._looping = False  # run() is serving, on whichever thread called it
        self._moe_layers = [i for i, _ in model.moe_layers()]

    # -- control -----------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Serve on a background thread (idempotent); see :meth:`run` for the faster main-thread way."""
        if self._thread is None:
            self._looping = True  # submit() may be called before the thread is scheduled
            self._thread = threading.Thread(target=self.run, name="moekit-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Serve on the calling thread until :meth:`stop`. ``moekit serve`` runs it on the main thread: with
        OpenMP, a thread other than the main one pays for a new thread team whenever ATen's intra-op thread
        count changes (moekit's decode path changes it per MoE layer), measured 3x slower decoding at batch 1."""
        self._looping = True
        try:
            self._loop()
        finally:
            self._looping = False

    def stop(self) -> None:
        """End every request (``Finished('error', 'server shutting down')``) and the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._looping and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; raises :class:`QueueFull` or :class:`EngineStopped` instead of waiting."""
        request = Request([int(t) for t in prompt], params, sink)
        with self._wake:
            if not self.alive:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue cap)")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[TokenChoice]]:
        """Submit every prompt at once and wait for all (for tests and scripts): each prompt's tokens."""
        done = threading.Semaphore(0)
        outputs: list[list[TokenChoice]] = [[] for _ in prompts]

        def sink_for(i: int) -> Sink:
            def sink(event: Event) -> None:
                if isinstance(event, Finished):
                    done.release()
                elif isinstance(event, TokenChoice):
                    outputs[i].append(event)

            return sink

        for i, prompt in enumerate(prompts):
            self.submit(prompt, params, sink_for(i))
        for _ in prompts:
            done.acquire()
        return outputs

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        break
                    joining = self._admit()
                self._drop_ended()
                with torch.inference_mode():
                    if joining:
                        self._prefill(joining)
                    if self._running:
                        self._decode_step()
        except Exception as err:  # a model failure must end every request, not hang them
            log.exception("moekit serve: the engine failed")
            self._fail_all("error", f"engine failure: {err}")
            self._stopping = True
            return
        self._fail_all("error", "server shutting down")

    def _admit(self) -> list[Request]:
        joining: list[Request] = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            request = self._waiting.popleft()
            if request.cancelled:
                request.sink(Finished("cancelled"))
            elif self._expired(request):
                request.sink(Finished("timeout", "the request timed out while queued"))
            else:
                joining.append(request)
        return joining

    def _expired(self, request: Request) -> bool:
        timeout = request.params.timeout_s
        return timeout is not None and time.monotonic() - request.arrived > timeout

    def _drop_ended(self) -> None:
        """End running requests that were cancelled or are past their deadline; free their rows."""
        ended = []
        for request in self._running:
            if request.cancelled:
                ended.append((request, Finished("cancelled")))
            elif self._expired(request):
                ended.append((request, Finished("timeout", "the request timed out")))
        if ended:
            self._remove([r for r, _ in ended])
            for request, event in ended:
                request.sink(event)

    def _remove(self, requests: list[Request]) -> None:
        gone = set(map(id, requests))
        keep = [i for i, r in enumerate(self._running) if id(r) not in gone]
        kept = [self._running[i] for i in keep]
        if kept and self._cache is not None:
            self._cache = combine([(self._cache, keep, [r.length for r in kept])], self._headroom(kept))
        else:
            self._cache = None
        self._running = kept
        self.stats.running = len(kept)

    def _headroom(self, rows: Sequence[Request]) -> int:
        """Positions the longest-lived row may still append (so the cache is rebuilt only on join/leave)."""
        return max(r.params.max_tokens - r.generated for r in rows) + 1

    def _fail_all(self, reason: str, message: str) -> None:
        with self._wake:
            pending = list(self._waiting) + self._running
            self._waiting.clear()
        self._running, self._cache = [], None
        for request in pending:
            request.sink(Finished(reason, message))

    # -- model steps -------------------------------------------------------------------------------
    def _prefill(self, joining: list[Request]) -> None:
        """Encode the joining prompts together (left-padded), pick their first tokens, merge their rows.

        A request with ``prompt_logprobs`` gets its prompt scored first (the forward then keeps every position's
        logits); one with ``max_tokens=0`` (scoring only) ends there without taking a row."""
        B, L = len(joining), max(len(r.prompt) for r in joining)
        ids_BL = torch.zeros((B, L), dtype=torch.long, device=self.device)
        mask_BL = torch.zeros((B, L), dtype=torch.bool, device=self.device)
        for b, request in enumerate(joining):
            ids_BL[b, L - len(request.prompt) :] = torch.tensor(request.prompt, device=self.device)
            mask_BL[b, L - len(request.prompt) :] = True
            request.sampler = Sampler(request.params, self.vocab_limit, self.device)
            self.stats.prompt_tokens += len(request.prompt)
        cache = self.model.new_cache()
        routed = any(r.params.return_routed_experts for r in joining)
        scoring = any(r.params.prompt_logprobs for r in joining)
        mask = None if bool(mask_BL.all()) else mask_BL
        out = self.model(ids_BL, attention_mask=mask, cache=cache, logits_to_keep=0 if scoring else 1,
                         record_routing=routed)  # fmt: skip
        experts = self._experts(out.moe_aux, B, L) if routed else None
        self._count_experts(out.moe_aux)
        stay = []
        for b, request in enumerate(joining):
            if request.params.prompt_logprobs:
                assert request.sampler is not None
                request.sink(
                    PromptScores(request.sampler.score_prompt(request.prompt, out.logits[b, L - len(request.prompt) :]))
                )
            if request.params.max_tokens > 0:
                stay.append(b)
            else:
                request.sink(Finished("length"))
        if not stay:
            return
        parts: list[tuple[KVCache, Sequence[int], list[int]]] = [(cache, stay, [len(joining[b].prompt) for b in stay])]
        if self._running and self._cache is not None:
            parts.insert(0, (self._cache, range(len(self._running)), [r.length for r in self._running]))
        staying = [joining[b] for b in stay]
        everyone = self._running + staying
        self._cache = combine(parts, self._headroom(everyone))
        self._running = everyone
        self._emit(staying, out.logits[stay, -1], None if experts is None else [experts[b] for b in stay])

    def _decode_step(self) -> None:
        rows = self._running
        ids_B1 = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)
        routed = any(r.params.return_routed_experts for r in rows)
        out = self.model(ids_B1, cache=self._cache, logits_to_keep=1, record_routing=routed)
        experts = self._experts(out.moe_aux, len(rows), 1) if routed else None
        self._count_experts(out.moe_aux)
        self.stats.steps += 1
        self._emit(list(rows), out.logits[:, -1], experts)

    def _emit(self, requests: list[Request], logits_BV: torch.Tensor, experts) -> None:
        """Pick each request's token, send it, and retire the rows that are done."""
        done: list[tuple[Request, Finished]] = []
        for b, request in enumerate(requests):
            assert request.sampler is not None
            choice = request.sampler.pick(logits_BV[b : b + 1])
            if choice.token_id in request.params.stop_token_ids:
                done.append((request, Finished("stop")))
                continue
            if experts is not None and request.params.return_routed_experts:
                choice.experts = experts[b]
            request.generated += 1
            request.last_token = choice.token_id
            self.stats.generated_tokens += 1
            request.sink(choice)
            if request.generated >= request.params.max_tokens or request.length >= self.context:
                done.append((request, Finished("length")))
        self.stats.running = len(self._running)
        if done:
            self._remove([r for r, _ in done])
            for request, event in done:
                request.sink(event)

    def _experts(self, moe_aux, B: int, S: int) -> list[list[list[int]]]:
        """Per row, the experts each MoE layer chose at the row's last position: [B][layers][top_k]."""
        per_layer = []
        for aux in moe_aux:
            experts_TK = layer_routing(aux, aux.tokens_per_expert.numel()).experts_TK.view(B, S, -1)
            per_layer.append(experts_TK[:, -1].tolist())
        return [[layer[b] for layer in per_layer] for b in range(B)]

    def _count_experts(self, moe_aux) -> None:
        for layer, aux in zip(self._moe_layers, moe_aux):
            counts = aux.tokens_per_expert.tolist()
            totals = self.stats.expert_tokens.setdefault(layer, [0] * len(counts))
            for e, n in enumerate(counts):
                totals[e] += int(n)
