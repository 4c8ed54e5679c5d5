"""Steps from models behind OpenAI-compatible servers (vLLM, SGLang), with replicas, retries and affinity.

A model argument that is a URL (`http://host:8000/v1`, several joined by commas for replicas) names a served
model. Its served name comes from `/v1/models`; a local tokenizer (the checkpoint folder, or `tokenizer=`) turns
text into ids, so prompts go over the wire as token ids and come back as token ids: the trajectory is the same
token sequence the server computed, exactly as in-process.

One step is one `/v1/completions` request: the prefix ids as the prompt, the step delimiter as a stop string kept
in the output, the step cap as `max_tokens`. Why it stopped is read from both servers' conventions:
  - vLLM: finish_reason "length" = cap; "stop" with stop_reason = the delimiter string = delimiter; "stop" with
    stop_reason null (the EOS token) or an int (another stop token id of the generation config) = EOS;
  - SGLang: the same, with `matched_stop` in place of `stop_reason`.
The server's prefix cache does the job of the in-process KV cache: a trajectory is sent back to the replica that
served its last step (affinity), where its prefix is cached, unless that replica is much busier than another.

A greedy request that carries a proposal (a rejected draft step) is first verified on vLLM: one request reads
prefix + proposal with `prompt_logprobs` (top-1), which gives the target's own argmax at every proposal position;
the step keeps the proposal's longest prefix equal to it plus the target's own next token, and goes on with the
usual request only if the step has not ended there. The step is the one the target writes without the proposal.

Everything here is asynchronous (`httpx.AsyncClient`); the synchronous `StepGenerator` methods run the same
coroutines on a private event-loop thread, so the lock-step `StepwiseDecoder` and the asynchronous controller
(`rsd.async_loop`) drive the same code.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import threading
import time
import weakref
from collections.abc import Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from rsd.core import ModelCost, RSDError, Speculation, StepOutput, StepParams, StepRequest, StopReason

log = logging.getLogger("rsd.served")
T = TypeVar("T")

URL_SCHEMES = ("http://", "https://")
# A probe the server and the local tokenizer must split identically (digits, spaces, newlines, punctuation).
TOKENIZER_PROBE = "Tom has 3 apples and buys 4 more: 3 + 4 = 7.\n\nThe answer is \\boxed{7}."
VERIFY_MIN_TOKENS = 10  # see ServerOptions.verify_min_tokens
VERIFY_CHOICES = ("auto", "always", "never")  # ServedStepGenerator(verify=...)
DELIMITER_WINDOW_SLACK = 4  # tokens beyond the delimiter's bytes a window decodes (characters split over tokens)


def is_server_url(model: object) -> bool:
    """Whether a model argument names served models rather than a checkpoint."""
    return isinstance(model, str) and model.strip().lower().startswith(URL_SCHEMES)


def parse_server_urls(spec: str | Sequence[str], role: str) -> list[str]:
    """Server roots (no trailing `/v1`) from `http://a:8000/v1,http://b:8000/v1` or a list of such URLs."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    roots = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if not is_server_url(part):
            raise RSDError(f"--{role} {part!r} is not a server URL; write it as http://HOST:PORT/v1.")
        check_server_url(part, role)
        root = part.rstrip("/").removesuffix("/v1").rstrip("/")
        if root not in roots:
            roots.append(root)
    if not roots:
        raise RSDError(f"no {role} server URL given; pass --{role} http://HOST:PORT/v1 (commas for replicas).")
    return roots


class RequestRejected(RSDError):
    """A server answered a request with HTTP 4xx: the request's own fault, not the server's."""


def check_server_url(url: str, role: str) -> None:
    """Host and port of a server URL, checked before any request (a bad port would fail deep inside one)."""
    try:
        parsed = urlsplit(url)
        port = parsed.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise RSDError(f"--{role} {url!r} is not a valid URL ({exc}); write it as http://HOST:PORT/v1.") from None
    if not parsed.hostname or any(c.isspace() for c in parsed.hostname):
        raise RSDError(f"--{role} {url!r} names no valid host; write it as http://HOST:PORT/v1.")
    if port == 0:
        raise RSDError(f"--{role} {url!r}: port 0 is not a server's port; give the port it listens on (1-65535).")


@dataclass(frozen=True)
class ServerOptions:
    """How one role talks to its servers. Defaults suit a few GPUs; raise `max_concurrency` for many replicas."""

    max_concurrency: int = 64  # requests in flight to this role's servers together (the rest wait their turn)
    timeout_s: float = 600.0  # one request, from sending to the last byte of the answer
    connect_timeout_s: float = 10.0  # reaching a server; also bounds the start-up checks
    retries: int = 4  # further tries after a connection error, a timeout or a 5xx answer
    backoff_s: float = 0.5  # wait before the first retry; doubles with every further one
    max_backoff_s: float = 8.0
    affinity_slack: int = 4  # keep a trajectory on its replica unless it has this many more requests in flight
    # Verify a rewrite's proposal (greedy, vLLM) when it has at least this many tokens, and when the replica has at
    # most `verify_max_in_flight` other requests in flight: a shorter proposal saves fewer decode steps than the
    # verifying request costs, and on a busy server that request's prefill (it reads no prefix cache) slows every
    # other request (docs/serving.md has the figures).
    verify_min_tokens: int = VERIFY_MIN_TOKENS
    verify_max_in_flight: int = 0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.retries < 0 or self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise RSDError("server options: max_concurrency >= 1, retries >= 0 and positive timeouts, please.")
        if self.verify_min_tokens < 1 or self.verify_max_in_flight < 0:
            raise RSDError("server options: verify_min_tokens >= 1 and verify_max_in_flight >= 0, please.")


@dataclass(eq=False)
class Server:
    root: str
    in_flight: int = 0
    failed_until: float = 0.0  # monotonic time before which new requests avoid this server
    requests: int = 0
    failures: int = 0
    failing: int = 0  # consecutive failures: a dead replica is tried again ever more rarely (up to once a minute)


@dataclass
class ServedModelInfo:
    """What `/v1/models` says about the model a role's servers serve."""

    name: str  # the served model name, sent as `model` with every request
    root: str | None  # the path or hub id the server loaded (vLLM), where a tokenizer may be found
    kind: str  # "vllm", "sglang" or "openai" (anything else): which request fields and conventions apply
    max_model_len: int | None


class ServerPool:
    """The servers of one role: start-up checks, load balancing with affinity, retries with backoff, timeouts."""

    def __init__(self, urls: str | Sequence[str], role: str, options: ServerOptions | None = None) -> None:
        self.role = role
        self.options = options or ServerOptions()
        self.servers = [Server(root) for root in parse_server_urls(urls, role)]
        self.retried = 0  # requests sent again after a failure, over the pool's life
        self._affinity: dict[Hashable, Server] = {}
        self._next = 0  # round-robin start among equally loaded servers
        # An httpx client and a semaphore belong to one event loop: keep one of each per loop that uses the pool.
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, Any]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def urls(self) -> list[str]:
        return [f"{s.root}/v1" for s in self.servers]

    # -- start-up checks ------------------------------------------------------------------------------------
    def discover(self, served_model: str | None = None) -> ServedModelInfo:
        """Ask every server what it serves; one clear error if one is down or they disagree."""
        infos = run_sync(self._models_of_all())
        names = {s.root: info.name for s, info in zip(self.servers, infos, strict=True)}
        if served_model is not None:
            for server, info in zip(self.servers, infos, strict=True):
                if served_model not in info.aliases:
                    raise RSDError(
                        f"the {self.role} server {server.root}/v1 serves {sorted(info.aliases)}, not {served_model!r}; "
                        f"point --{self.role} at a server of that model, or pass its served name."
                    )
        elif len(set(names.values())) > 1:
            listing = ", ".join(f"{root} serves {name!r}" for root, name in names.items())
            raise RSDError(f"the {self.role} replicas serve different models ({listing}); give replicas of one model.")
        first = infos[0]
        name = served_model or first.name
        return ServedModelInfo(name, first.root, first.kind, first.max_model_len)

    async def _models_of_all(self) -> list[_ModelsAnswer]:
        return list(await asyncio.gather(*(self._models_of(s) for s in self.servers)))

    async def _models_of(self, server: Server) -> _ModelsAnswer:
        url = f"{server.root}/v1/models"
        try:
            response = await self.client().get(url, timeout=self.options.connect_timeout_s)
        except httpx.HTTPError as exc:
            raise RSDError(
                f"cannot reach the {self.role} server at {server.root}/v1 ({describe(exc)}); start it (e.g. "
                f"`vllm serve MODEL --port PORT`) or fix the URL given for {self.role}."
            ) from exc
        if response.status_code != 200:
            raise RSDError(
                f"{url} answered HTTP {response.status_code}; is {server.root} an OpenAI-compatible server "
                "(vLLM, SGLang)? Give the URL that ends in /v1."
            )
        models = response.json().get("data") or []
        if not models:
            raise RSDError(f"the {self.role} server {server.root} serves no model; start it with a model.")
        first = models[0]
        owner = str(first.get("owned_by") or "").lower()
        kind = owner if owner in ("vllm", "sglang") else "openai"
        return _ModelsAnswer(
            name=first["id"],
            root=first.get("root"),
            kind=kind,
            max_model_len=first.get("max_model_len"),
            aliases={m["id"] for m in models} | {m["root"] for m in models if m.get("root")},
        )

    # -- requests -------------------------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        return self._loop_state()[0]

    def _loop_state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            # Idle connections are dropped before uvicorn's 5 s keep-alive ends, so a request never races the
            # server closing the connection it reuses.
            limits = httpx.Limits(
                max_connections=self.options.max_concurrency, max_keepalive_connections=None, keepalive_expiry=2.0
            )
            timeout = httpx.Timeout(self.options.timeout_s, connect=self.options.connect_timeout_s)
            client = httpx.AsyncClient(limits=limits, timeout=timeout)
            state = (client, asyncio.Semaphore(self.options.max_concurrency))
            self._per_loop[loop] = state
        return state

    async def aclose(self) -> None:
        """Close this event loop's connections (the asynchronous controller calls it when its run ends)."""
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].aclose()

    async def post(self, path: str, payload: dict, key: Hashable | None = None) -> dict:
        """POST a JSON body to one of the servers and return its JSON answer.

        Connection errors, timeouts and 5xx answers are retried with exponential backoff, on another replica
        when there is one; a 4xx answer is the request's fault and raises at once.
        """
        client, semaphore = self._loop_state()
        opts = self.options
        error = ""
        tried: list[str] = []
        for attempt in range(opts.retries + 1):
            server = self._pick(key)
            tried += [server.root] if server.root not in tried else []
            async with semaphore:
                server.in_flight += 1
                server.requests += 1
                try:
                    response = await client.post(server.root + path, json=payload)
                except httpx.TransportError as exc:  # refused, reset, timed out, closed mid-answer
                    response, error = None, describe(exc)
                finally:
                    server.in_flight -= 1
            if response is not None and response.status_code < 500:
                if response.status_code >= 400:
                    raise RequestRejected(self._rejected_message(server, path, response))
                if key is not None:
                    self._affinity[key] = server
                server.failing = 0
                return response.json()
            if response is not None:
                error = f"HTTP {response.status_code}: {short_body(response)}"
            server.failures += 1
            server.failing += 1
            server.failed_until = time.monotonic() + min(60.0, opts.connect_timeout_s * 2 ** (server.failing - 1))
            self._affinity.pop(key, None)
            if attempt < opts.retries:
                self.retried += 1
                wait = min(opts.max_backoff_s, opts.backoff_s * 2**attempt)
                log.warning(
                    "%s server %s failed (%s); retry %d of %d in %.1f s",
                    self.role, server.root, error, attempt + 1, opts.retries, wait,
                )  # fmt: skip
                await asyncio.sleep(wait)
        where = f"server {tried[0]}" if len(tried) == 1 else f"servers ({', '.join(tried)})"
        raise RSDError(
            f"the {self.role} {where} failed {opts.retries + 1} times in a row (last: {error}); check that "
            f"{'it is' if len(tried) == 1 else 'they are'} running (the server log says why it stopped), "
            f"or drop the dead URL from the {self.role} URLs."
        )

    def _pick(self, key: Hashable | None) -> Server:
        """The trajectory's last replica while it is healthy and not much busier; else the least busy one."""
        now = time.monotonic()
        healthy = [s for s in self.servers if s.failed_until <= now] or sorted(
            self.servers, key=lambda s: s.failed_until
        )[:1]
        least = min(s.in_flight for s in healthy)
        sticky = self._affinity.get(key) if key is not None else None
        if sticky in healthy and sticky.in_flight <= least + self.options.affinity_slack:
            return sticky
        n = len(self.servers)
        for offset in range(n):
            server = self.servers[(self._next + offset) % n]
            if server in healthy and server.in_flight == least:
                self._next = (self._next + offset + 1) % n
                return server
        return healthy[0]  # unreachable: some healthy server has the least load

    def load(self, key: Hashable | None) -> int:
        """Requests in flight at the replica a request for `key` would go to (its trajectory's, or the least busy)."""
        now = time.monotonic()
        healthy = [s for s in self.servers if s.failed_until <= now] or self.servers
        least = min(s.in_flight for s in healthy)
        sticky = self._affinity.get(key) if key is not None else None
        if sticky in healthy and sticky.in_flight <= least + self.options.affinity_slack:
            return sticky.in_flight
        return least

    def _rejected_message(self, server: Server, path: str, response: httpx.Response) -> str:
        detail = short_body(response)
        if response.status_code == 404:
            return (
                f"the {self.role} server {server.root} has no {path} endpoint (HTTP 404: {detail}); it serves "
                f"another kind of model than the {self.role} role needs: see docs/serving.md for the serve line."
            )
        return f"the {self.role} server {server.root} rejected a {path} request (HTTP {response.status_code}): {detail}"

    def forget(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self._affinity.pop(key, None)


@dataclass
class _ModelsAnswer(ServedModelInfo):
    aliases: set[str] = field(default_factory=set)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def short_body(response: httpx.Response, limit: int = 300) -> str:
    try:
        body = response.json()
        message = body.get("message") or body.get("error") or body.get("detail") or body
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except (json.JSONDecodeError, AttributeError, ValueError):
        text = response.text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# -- running coroutines from synchronous code ---------------------------------------------------------------
_runner_lock = threading.Lock()
_runner_loop: asyncio.AbstractEventLoop | None = None


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, notebooks (a running loop) included.

    All synchronous calls share one event loop on a daemon thread, so their connections stay open between calls.
    """
    global _runner_loop
    with _runner_lock:
        if _runner_loop is None or _runner_loop.is_closed():
            _runner_loop = asyncio.new_event_loop()
            threading.Thread(target=_runner_loop.run_forever, name="rsd-http", daemon=True).start()
        loop = _runner_loop

    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


# -- tokenizers and costs -------------------------------------------------------------------------------------
def load_served_tokenizer(tokenizer: str | Any | None, info: ServedModelInfo, role: str) -> Any:
    """The local tokenizer of a served model: the one given, else the folder or hub id the server loaded."""
    from rsd.hf_loading import load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    try:
        return load_tokenizer(tokenizer or info.root or info.name, role)
    except RSDError as exc:
        if tokenizer is not None:
            raise
        raise RSDError(
            f"the {role} server serves {info.name!r}, whose tokenizer is not on this machine; pass the checkpoint "
            f"folder or hub id of its tokenizer (--{role}-tokenizer)."
        ) from exc


def checkpoint_cost(folder: str | None) -> ModelCost:
    """FLOP accounting facts of a local checkpoint, read from config.json and the safetensors headers only.

    Counts parameters as the in-process backend does: all of them but the input embedding table, which is counted
    back when the output head shares it. A served model with no local checkpoint costs 0 (FLOPs unknown).
    """
    path = Path(folder).expanduser() if folder else None
    if path is None or not (path / "config.json").is_file():
        return ModelCost(parameters=0)
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config)
    shapes = safetensors_shapes(path)
    embedding = sum(math.prod(s) for name, s in shapes.items() if name.endswith("embed_tokens.weight"))
    parameters = sum(math.prod(s) for s in shapes.values()) - embedding
    has_head = any(name.endswith("lm_head.weight") for name in shapes)
    if config.get("tie_word_embeddings") and not has_head and "ForCausalLM" in str(config.get("architectures")):
        parameters += embedding
    heads = int(config.get("num_attention_heads") or 0)
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    return ModelCost(
        parameters=max(parameters, 0),
        layers=int(config.get("num_hidden_layers") or 0),
        attention_width=heads * int(head_dim),
    )


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of a checkpoint's safetensors files (no weights are read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        shapes.update({name: meta["shape"] for name, meta in header.items() if name != "__metadata__"})
    return shapes


def tokenizer_folder(tokenizer: str | Any | None, info: ServedModelInfo) -> str | None:
    """Where a checkpoint's config.json may be found for cost accounting."""
    candidates = [tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None), info.root]
    for candidate in candidates:
        if candidate and (Path(candidate).expanduser() / "config.json").is_file():
            return candidate
    return None


def request_seed(seed: int, key: Hashable, position: int) -> int:
    """A per-request sampling seed fixed by (run seed, trajectory, position): reruns draw the same steps."""
    digest = hashlib.sha256(f"{seed}\x1f{key!r}\x1f{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def context_sum(start: int, count: int) -> int:
    """Sum of context lengths of tokens at positions start .. start+count-1 (position p attends to p+1 tokens)."""
    return count * (2 * start + count + 1) // 2


# -- reading a completion ---------------------------------------------------------------------------------------
def stop_reason_of(choice: dict, delimiter: str) -> StopReason:
    """Why a completion choice ended, under vLLM's or SGLang's conventions (see the module docstring)."""
    finish = choice.get("finish_reason")
    if finish == "length":
        return StopReason.LENGTH
    if finish != "stop":
        raise RSDError(f"the server ended a step with finish_reason {finish!r}; expected 'stop' or 'length'.")
    matched = choice["stop_reason"] if "stop_reason" in choice else choice.get("matched_stop")
    if isinstance(matched, str):
        if matched != delimiter:
            raise RSDError(f"the server stopped at {matched!r}, a stop string rsd did not send; check its defaults.")
        return StopReason.DELIMITER
    return StopReason.EOS  # null: the EOS token; an int: another stop token id of the model's generation config


def token_ids_of(choice: dict) -> list[int] | None:
    """The generated ids, from vLLM's `token_ids` or from logprobs tokens written as `token_id:N`."""
    ids = choice.get("token_ids") or choice.get("output_ids")
    if ids is not None:
        return [int(t) for t in ids]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.split(":", 1)[1]) for t in tokens]
    return None


def own_choices(prompt_logprobs: Sequence[dict | None]) -> list[int]:
    """The model's argmax at each prompt position, from vLLM's `prompt_logprobs` with top-1 (token id -> rank)."""
    choices = []
    for position in prompt_logprobs:
        if not position:
            raise RSDError("the server returned no prompt logprobs for a position; is it vLLM 0.11 or later?")
        firsts = [int(token) for token, entry in position.items() if entry.get("rank") == 1]
        if not firsts:
            raise RSDError("the server's prompt logprobs name no top-1 token; is it vLLM 0.11 or later?")
        # Two firsts only on a tie: the top-1 entry is then the other one (the prompt's token comes first).
        choices.append(firsts[-1])
    return choices


def agreeing_length(proposal: Sequence[int], choices: Sequence[int]) -> int:
    """How many first tokens of `proposal` equal the model's own choice at their position."""
    n = 0
    while n < len(proposal) and proposal[n] == choices[n]:
        n += 1
    return n


def delimiter_end(tokens: Sequence[int], start: int, delimiter: str, decode: Any) -> int | None:
    """The length of `tokens` at which the delimiter first appears in their text, looking at tokens `start` on
    (tokens[:start] hold none), or None. A delimiter completed by a token lies within its last len(bytes) tokens."""
    window = len(delimiter.encode("utf-8")) + DELIMITER_WINDOW_SLACK
    for n in range(start + 1, len(tokens) + 1):
        if delimiter in decode(tokens[max(0, n - window) : n]):
            return n
    return None


class ServedStepGenerator:
    """A model behind OpenAI-compatible servers as a `StepGenerator`, with an asynchronous one-step method."""

    def __init__(
        self,
        urls: str | Sequence[str],
        role: str = "draft",
        tokenizer: str | Any | None = None,
        served_model: str | None = None,
        options: ServerOptions | None = None,
        cost: ModelCost | None = None,
        verify: str = "auto",
    ) -> None:
        if verify not in VERIFY_CHOICES:
            raise RSDError(f"verify={verify!r}: choose one of {', '.join(VERIFY_CHOICES)}.")
        self.role = role
        self.pool = ServerPool(urls, role, options)
        self.info = self.pool.discover(served_model)
        self.name = self.info.name
        self.tokenizer = load_served_tokenizer(tokenizer, self.info, role)
        # Whether requests' proposals are verified first (greedy, vLLM): "auto" where it pays, "always", or "never"
        # (`--rewrite plain`). The step is the same either way; only the requests and their cost differ.
        self.verify = verify
        self.speculating = False  # whether the server speculates itself (vLLM's --speculative-config), seen at start
        # Stop tokens are special tokens; whether one of them ends a step is the server's call (its generation
        # config may add some), so a verified step never ends at one that the server has not generated itself.
        self.special_ids = set(getattr(self.tokenizer, "all_special_ids", None) or ())
        self.cost = cost or checkpoint_cost(tokenizer_folder(tokenizer, self.info))
        self.vocab_size = None  # the served embedding table is not visible over HTTP
        run_sync(self._check_server())

    # -- the StepGenerator interface --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def vocabulary_fingerprint(self) -> str:
        from rsd.hf_loading import vocabulary_fingerprint

        return vocabulary_fingerprint(self.tokenizer)

    @property
    def context_length(self) -> int | None:
        """The servers' `max_model_len`, where `/v1/models` gives it."""
        return self.info.max_model_len

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        async def all_steps() -> list[StepOutput]:
            return list(await asyncio.gather(*(self.agenerate_step(r, params) for r in requests)))

        return run_sync(all_steps())

    def release(self, keys: Sequence[Hashable]) -> None:
        self.pool.forget(keys)

    async def aclose(self) -> None:
        await self.pool.aclose()

    # -- one step ---------------------------------------------------------------------------------------------
    async def agenerate_step(self, request: StepRequest, params: StepParams) -> StepOutput:
        if request.max_tokens < 1:
            return StepOutput([], "", StopReason.LENGTH, prefill_tokens=0, decode_tokens=0)
        if not request.prefix_ids:
            raise RSDError(f"request {request.key!r} has an empty prefix; give it at least one prompt token.")
        step = StepOutput([], "", StopReason.LENGTH, prefill_tokens=0, decode_tokens=0)
        proposal = self.verifiable_proposal(request, params)
        try:
            if proposal and await self._verify(request, proposal, params, step):
                return step
        except RequestRejected as exc:  # a server that refuses prompt logprobs (its --max-logprobs, say)
            log.warning("the %s server refused a verifying request (%s); rewrites go on without", self.role, exc)
            self.verify = "never"
        await self._generate(request, params, step)
        return step

    async def _generate(self, request: StepRequest, params: StepParams, step: StepOutput) -> None:
        """Write the step on from the tokens it holds (none, or a verified part) with the usual requests."""
        verified = len(step.token_ids)
        while True:
            prefix = [*request.prefix_ids, *step.token_ids]
            piece = StepRequest(request.key, prefix, request.max_tokens - len(step.token_ids))
            body = await self.pool.post("/v1/completions", self._payload(piece, params), key=request.key)
            self._extend(step, piece, body, params)
            # vLLM's incremental detokenizer, given a prompt that ends inside a multi-byte character, re-emits the
            # prompt's text as output and can "find" the delimiter there. A step ends at a delimiter of its own:
            # otherwise generation goes on from where the server stopped.
            if step.stop is not StopReason.DELIMITER or params.delimiter in step.text:
                break
            if len(step.token_ids) >= request.max_tokens:
                step.stop = StopReason.LENGTH
                break
        if verified:
            # The server looks for the delimiter in its output alone: one that begins in the verified part and ends
            # in the output went unseen there, and ends the step where the target writing alone would have stopped.
            end = delimiter_end(step.token_ids, verified, params.delimiter, self._text)
            if end is not None and end < len(step.token_ids):
                del step.token_ids[end:]
                step.text, step.stop = self._text(step.token_ids), StopReason.DELIMITER

    # -- verifying a proposal -----------------------------------------------------------------------------------
    def verifiable_proposal(self, request: StepRequest, params: StepParams) -> list[int]:
        """The part of the request's proposal to verify, or [] where verifying does not pay or is not exact.

        Greedy only: a served sampler's draws are not rsd's, so a sampled proposal could not be checked against
        them. vLLM only: SGLang's completions return no prompt logprobs. Cut to leave room for the target's own
        next token within the step cap, and before the first special token (whether it stops the step is for the
        server to say, by generating it). "auto" verifies only where it pays (`_verifying_pays`); "always"
        wherever it is exact."""
        if self.verify == "never" or self.info.kind != "vllm" or params.temperature != 0:
            return []
        proposal = list(request.proposal[: request.max_tokens - 1])
        special = next((i for i, token in enumerate(proposal) if token in self.special_ids), len(proposal))
        proposal = proposal[:special]
        if self.verify == "auto" and not self._verifying_pays(request, len(proposal)):
            return []
        return proposal

    def _verifying_pays(self, request: StepRequest, tokens: int) -> bool:
        """The measured rule of "auto" (docs/serving.md): a proposal long enough, a server that does not speculate
        itself (its own draft writes the step faster than a verified one), and a replica that is not busy."""
        options = self.pool.options
        return (
            tokens >= options.verify_min_tokens
            and not self.speculating
            and self.pool.load(request.key) <= options.verify_max_in_flight
        )

    async def _verify(self, request: StepRequest, proposal: list[int], params: StepParams, step: StepOutput) -> bool:
        """One request reads prefix + proposal and gives the target's own choice at every proposal position; the
        step takes the agreeing prefix and the target's next token. Returns whether the step ended there."""
        prefix = list(request.prefix_ids)
        piece = StepRequest(request.key, [*prefix, *proposal], 1)
        payload = self._payload(piece, params) | {"prompt_logprobs": 1}
        body = await self.pool.post("/v1/completions", payload, key=request.key)
        choice = body["choices"][0]
        own = own_choices((choice.get("prompt_logprobs") or [])[len(prefix) :])
        if len(own) != len(proposal):
            raise RSDError(f"the {self.role} server returned prompt logprobs for {len(own)} of {len(proposal)} "
                           "proposed tokens; is it vLLM 0.11 or later?")  # fmt: skip
        kept = agreeing_length(proposal, own)
        server_stop = None
        if kept == len(proposal):  # all agree: the next token is the one the server generated, stop or not
            generated = token_ids_of(choice) or []
            server_stop = stop_reason_of(choice, params.delimiter)
            step.token_ids = [*proposal, *generated[:1]]
        else:  # a special token the server did not generate may stop the step: the next request writes it
            step.token_ids = proposal[:kept] + ([own[kept]] if own[kept] not in self.special_ids else [])
        self._count_verification(step, body, len(prefix), len(proposal))
        end = delimiter_end(step.token_ids, 0, params.delimiter, self._text)
        if end is not None:
            del step.token_ids[end:]
            step.stop = StopReason.DELIMITER
        elif server_stop is StopReason.EOS:
            step.stop = StopReason.EOS
        elif len(step.token_ids) >= request.max_tokens:
            step.stop = StopReason.LENGTH
        step.text = self._text(step.token_ids)
        step.speculation = Speculation(proposal_tokens=len(proposal), from_proposal=min(kept, len(step.token_ids)),
                                       rounds=1)  # fmt: skip
        return end is not None or server_stop is StopReason.EOS or len(step.token_ids) >= request.max_tokens

    def _count_verification(self, step: StepOutput, body: dict, prefix: int, proposal: int) -> None:
        """The verifying request's cost: the prefix tokens it ran (vLLM reads no cache for prompt logprobs), the
        proposal, and the one token it generated, all in one forward."""
        usage = body.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or prefix + proposal)
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        step.prefill_tokens += max(0, prefix - cached)
        step.decode_tokens += min(proposal, prompt - cached) + 1
        step.context_sum += context_sum(cached, prompt - cached) + context_sum(prompt, 1)
        step.forwards += 1

    def _text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _payload(self, request: StepRequest, params: StepParams) -> dict:
        max_tokens = request.max_tokens
        limit = self.info.max_model_len
        if limit is not None and len(request.prefix_ids) + max_tokens > limit:
            max_tokens = limit - len(request.prefix_ids)
            if max_tokens < 1:
                raise RSDError(
                    f"request {request.key!r}: its {len(request.prefix_ids)}-token prefix fills the {self.role} "
                    f"server's context ({limit} tokens); raise --max-model-len there or lower --max-new-tokens."
                )
        payload: dict[str, Any] = {
            "model": self.name,
            "prompt": list(request.prefix_ids),
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": [params.delimiter],
            "n": 1,
        }
        if params.temperature > 0:
            payload["seed"] = request_seed(params.seed, request.key, len(request.prefix_ids))
        if self.info.kind == "vllm":
            payload |= {"include_stop_str_in_output": True, "return_token_ids": True, "skip_special_tokens": True}
        elif self.info.kind == "sglang":
            payload["no_stop_trim"] = True  # SGLang's name for keeping the matched stop string
        return payload

    def _extend(self, step: StepOutput, request: StepRequest, body: dict, params: StepParams) -> None:
        """Add one completion's tokens, costs and stop reason to the step being built."""
        choice = body["choices"][0]
        step.stop = stop_reason_of(choice, params.delimiter)
        ids = token_ids_of(choice)
        if ids is None:  # a server that does not return ids: the text is all there is
            text = choice.get("text") or ""
            if step.stop is StopReason.DELIMITER and not text.endswith(params.delimiter):
                text += params.delimiter  # a server that trims the matched stop string
            ids = self.encode(text)
        step.token_ids += ids
        step.text = self._text(step.token_ids)
        usage = body.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or len(request.prefix_ids))
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        step.prefill_tokens += prompt - cached
        step.decode_tokens += len(ids)
        step.context_sum += context_sum(cached, prompt - cached) + context_sum(prompt, len(ids))
        # One forward of the target per generated token (the first with the prompt); a server that speculates
        # itself (vLLM's --speculative-config) runs fewer, which its /metrics count.
        step.forwards += len(ids)

    # -- start-up probe -----------------------------------------------------------------------------------------
    async def _check_server(self) -> None:
        """One tiny completion on every replica and, on vLLM, the server's tokenization of a probe text.

        Catches a PRM server given as a generator, and a local tokenizer that is not the served model's (whose
        ids would mean other text to the server) at start, not in the middle of a run.
        """
        probe_ids = self.encode(TOKENIZER_PROBE)
        for server in self.pool.servers:
            if self.info.kind == "vllm":
                self.speculating |= await self._speculates(server)
                payload = {"model": self.name, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
                served_ids = (await self._probe(server, "/tokenize", payload)).get("tokens")
                if served_ids is not None and list(served_ids) != probe_ids:
                    raise RSDError(
                        f"the local {self.role} tokenizer splits text differently from the one of "
                        f"{server.root} ({self.name}); pass that model's tokenizer as the {self.role} tokenizer."
                    )
            payload = {"model": self.name, "prompt": probe_ids[:4], "max_tokens": 1, "temperature": 0.0}
            await self._probe(server, "/v1/completions", payload)

    async def _speculates(self, server: Server) -> bool:
        """Whether a vLLM server runs speculative decoding: its /metrics then count draft tokens."""
        try:
            response = await self.pool.client().get(
                server.root + "/metrics", timeout=self.pool.options.connect_timeout_s
            )
        except httpx.HTTPError:
            return False  # no metrics: assume it does not
        return response.status_code == 200 and "vllm:spec_decode" in response.text

    async def _probe(self, server: Server, path: str, payload: dict) -> dict:
        try:
            response = await self.pool.client().post(server.root + path, json=payload)
        except httpx.HTTPError as exc:
            raise RSDError(f"the {self.role} server {server.root} did not answer {path} ({describe(exc)}).") from exc
        if response.status_code >= 400:
            raise RSDError(
                f"the {self.role} server {server.root} cannot generate ({path}: HTTP {response.status_code}: "
                f"{short_body(response)}); a {self.role} needs a generating server (`vllm serve MODEL`, "
                "no --runner pooling)."
            )
        return response.json()
