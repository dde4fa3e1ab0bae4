"""Test-time VGF behind an OpenAI-compatible HTTP API: ``create_app(model, tokenizer, scorer, defaults, config)``
is a FastAPI app (``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``);
``vgf-llm serve`` runs it with uvicorn.

Each choice is the selected particle of ``num_generations`` samples after the transport. A request's VGF knobs are
extra body fields with ``SamplerConfig``'s names, validated by ``SamplerConfig`` itself. Requests that arrive within
``batch_window_ms`` of each other and ask for the same settings run as one ``sample_batch(config, prompts, seed)``
call (one rollout + one transport), so throughput grows with load. One worker thread runs the batches in turn: the
model and torch's global RNG are never shared by two batches at once.

A request with a ``seed`` runs in a batch of its own, so it reproduces
``VGFSampler(model, tokenizer, scorer, config).sample(prompts, seed)`` whatever else the server is doing; unseeded
requests share batches (their samples depend on the batch, as ``generate``'s do).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hmac
import itertools
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from vgf_llm.checks import context_length, prompt_lengths, prompt_problem
from vgf_llm.sampler import SamplerConfig, SampleResult, VGFSampler, likelihood_weight_for

logger = logging.getLogger(__name__)

# the per-request knobs: SamplerConfig's fields, less the one that is the server's memory (its batch size)
KNOBS = frozenset(f.name for f in fields(SamplerConfig)) - {"generation_batch_size"}
BUDGET = ("transport_steps", "transport_step_size")
STEER_MIN_GENERATIONS = 4  # steer_prefix fits its prefix value to a batch's scores: fit_prefix_value needs 4 samples
_SAMPLER_CONFIG = TypeAdapter(SamplerConfig)  # checks types, then runs SamplerConfig's own __post_init__ checks


@dataclass
class ServeConfig:
    """What the server accepts and how it batches (the sampler's defaults are a ``SamplerConfig``)."""

    served_model_name: str | None = field(default=None, metadata={
        "help": "The model id clients send and /v1/models lists (default: --model_name_or_path)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Every /v1 request must send `Authorization: Bearer KEY` (default: $VGF_LLM_API_KEY); required "
                "for a non-loopback --host."})
    max_num_generations: int = field(default=16, metadata={"help": "Largest num_generations a request may ask."})
    max_tokens: int = field(default=256, metadata={"help": "Largest max_tokens a request may ask."})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "Longest prompt, in tokens."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body (413 beyond)."})
    max_batch_size: int = field(default=16, metadata={
        "help": "Most prompts (a request's prompts x n) in one sampling call; one request may not ask more."})
    batch_window_ms: float = field(default=20.0, metadata={
        "help": "How long the first request of a batch waits for others with the same settings."})
    request_timeout_s: float = field(default=600.0, metadata={"help": "A request unanswered by then gets a 504."})

    def __post_init__(self):
        for name in ("max_num_generations", "max_tokens", "max_prompt_tokens", "max_body_bytes", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("batch_window_ms must be >= 0 and request_timeout_s > 0")


class APIError(Exception):
    """A request the server answers with OpenAI's error JSON and ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, *, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """The first problem of a pydantic error as (message, param)."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


# -- requests -------------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    """OpenAI's fields that mean something here; extra fields must be VGF knobs (``KNOBS``)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None  # accepted and ignored, as an OpenAI client may send it
    return_particles: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


# -- batching -------------------------------------------------------------------------------------------------------
def batch_sampler(model, tokenizer, scorer, backend=None):
    """The default ``sample_batch``: one ``VGFSampler.sample`` over the whole batch (one rollout, one transport).
    ``backend(config)``: the rollout backend of a batch's settings (default: the sampler's HF generate)."""

    def sample_batch(config: SamplerConfig, prompts: list, seed: int) -> list[SampleResult]:
        config = replace(config, generation_batch_size=len(prompts) * config.num_generations)
        return VGFSampler(model, tokenizer, scorer, config, backend=backend and backend(config),
                          progress=False).sample(prompts, seed)

    return sample_batch


@dataclass
class Job:
    key: tuple
    config: SamplerConfig
    prompts: list
    seed: int | None
    future: asyncio.Future


class Batcher:
    """Collects jobs for ``window_s``, groups them by settings and calls ``sample_batch`` once per group (at most
    ``max_batch_size`` prompts), on one worker thread; each job gets its own slice of the results."""

    def __init__(self, sample_batch, window_s: float, max_batch_size: int):
        self.sample_batch, self.window_s, self.max_batch_size = sample_batch, window_s, max_batch_size
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgf-serve")
        self.seeds = itertools.count()  # seeds of unseeded batches
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        # queued batches are dropped; a running one is waited for, so nothing still uses the model once the app has
        # stopped (an in-process server, e.g. in a notebook, may hand the same model to the next one)
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.executor.shutdown, wait=True, cancel_futures=True))

    async def submit(self, config: SamplerConfig, prompts: list, seed: int | None) -> list[SampleResult]:
        # a seeded job is alone in its batch (a fresh key), so its samples depend on nothing else
        key = (tuple(sorted(asdict(config).items())), object() if seed is not None else None)
        job = Job(key, config, prompts, seed, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    def batches(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs grouped by key in arrival order, each group cut at ``max_batch_size`` prompts."""
        groups: dict[tuple, list[list[Job]]] = {}
        for job in jobs:
            runs = groups.setdefault(job.key, [[]])
            if runs[-1] and sum(len(j.prompts) for j in runs[-1]) + len(job.prompts) > self.max_batch_size:
                runs.append([])
            runs[-1].append(job)
        return [batch for runs in groups.values() for batch in runs]

    async def _loop(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.window_s)
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            for batch in self.batches(jobs):
                await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        batch = [job for job in batch if not job.future.done()]  # drop requests that timed out while queued
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        seed = batch[0].seed if batch[0].seed is not None else next(self.seeds)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.sample_batch, batch[0].config, prompts, seed)
        except Exception as err:  # noqa: BLE001 - handed to each waiting request, answered as a 500 there
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(results[start:start + len(job.prompts)])
            start += len(job.prompts)


# -- the service ----------------------------------------------------------------------------------------------------
class VGFService:
    """Turns validated requests into batcher jobs and results into OpenAI responses."""

    def __init__(self, model, tokenizer, scorer, defaults: SamplerConfig, config: ServeConfig, sample_batch):
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        # the request side (checks, token counts) has its own copy: the worker's batches set padding on theirs,
        # and a Rust tokenizer used from two threads at once fails ("Already borrowed")
        self.counter = copy.deepcopy(tokenizer)
        self.defaults, self.config = defaults, config
        self.name = config.served_model_name or "vgf"
        self.sample_batch = sample_batch
        self.batcher: Batcher | None = None

    def settings(self, req: _Request) -> SamplerConfig:
        """The request's ``SamplerConfig``: the server's defaults, overridden by its knobs, within the caps."""
        extra = dict(req.model_extra or {})
        unknown = sorted(set(extra) - KNOBS)
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown}; the VGF knobs are SamplerConfig's: {sorted(KNOBS)}",
                           param=unknown[0])
        length = req.max_tokens or getattr(req, "max_completion_tokens", None)
        standard = {"temperature": req.temperature, "top_p": req.top_p, "max_completion_length": length}
        knobs = {**extra, **{k: v for k, v in standard.items() if v is not None}}
        values = {**asdict(self.defaults), **knobs}
        if knobs.get("decoder", self.defaults.decoder) != self.defaults.decoder:
            values.update({k: knobs.get(k) for k in BUDGET})  # another decoder: its own budget unless one is given
        try:
            config = _SAMPLER_CONFIG.validate_python(values)
        except ValidationError as err:
            raise APIError(400, *validation_message(err)) from None
        caps = {("num_generations", "num_generations"): self.config.max_num_generations,
                ("max_completion_length", "max_tokens"): self.config.max_tokens}
        for (name, shown), cap in caps.items():
            if getattr(config, name) > cap:
                raise APIError(400, f"{shown}={getattr(config, name)} is above this server's cap of {cap}", shown)
        steered = config.decoder == "steer_prefix" and config.transport_steps > 0
        if steered and config.num_generations < STEER_MIN_GENERATIONS:  # a lone request's batch could not be fitted
            raise APIError(400, f"decoder=steer_prefix fits its prefix value to the particles' scores and needs "
                           f"num_generations >= {STEER_MIN_GENERATIONS}, got {config.num_generations} (or set "
                           "transport_steps=0: best-of-N)", "num_generations")
        try:  # the particle space refuses what it cannot run (e.g. top_p < 1 with steer_prefix)
            VGFSampler(self.model, self.counter, self.scorer, config, progress=False)
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err)) from None
        return config

    def check_prompts(self, prompts: list, max_completion_length: int) -> list[int]:
        """Each prompt's token count, refusing empty, malformed or too long prompts."""
        for prompt in prompts:
            problem = prompt_problem(prompt)
            if problem:
                raise APIError(400, problem, param="messages" if isinstance(prompt, list) else "prompt")
        lengths = prompt_lengths(prompts, self.counter)
        context = context_length(self.model)
        for n in lengths:
            if n > self.config.max_prompt_tokens:
                raise APIError(400, f"the prompt is {n} tokens, above this server's cap of "
                               f"{self.config.max_prompt_tokens}", code="context_length_exceeded")
            if context and n + max_completion_length > context:
                raise APIError(400, f"the prompt ({n} tokens) + max_tokens ({max_completion_length}) is more than "
                               f"the model's context of {context} tokens", code="context_length_exceeded")
        return lengths

    async def complete(self, req: _Request, prompts: list) -> tuple[SamplerConfig, list[SampleResult], int]:
        """Validate, queue (each prompt ``n`` times) and wait; (settings, results, prompt tokens)."""
        if req.stream:
            raise APIError(400, "stream=true is not supported: VGF selects the response after all its particles "
                           "are complete; send the request without stream", param="stream")
        if req.model is not None and req.model != self.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        rows = [p for p in prompts for _ in range(req.n)]
        if len(rows) > self.config.max_batch_size:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} = {len(rows)} completions, above this "
                           f"server's cap of {self.config.max_batch_size} per request", param="n")
        config = self.settings(req)
        lengths = self.check_prompts(prompts, config.max_completion_length)
        try:
            results = await asyncio.wait_for(self.batcher.submit(config, rows, req.seed),
                                             self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"no answer within the server's request timeout of {self.config.request_timeout_s} "
                           "s", code="timeout") from None
        return config, results, sum(lengths)

    def choice(self, index: int, kind: str, config: SamplerConfig, result: SampleResult,
               particles: bool) -> tuple[dict, int]:
        """One OpenAI choice with its ``vgf`` object, and its completion tokens: the response re-encoded (a decoded
        partial character can re-encode longer), at most the ``max_completion_length`` it was generated within."""
        chosen = result.particles[result.chosen]
        encoded = len(self.counter(result.response, add_special_tokens=False)["input_ids"])
        tokens = min(encoded, config.max_completion_length)
        vgf = {"score": chosen.score_after if result.chosen_moved else chosen.score_before,
               "moved": result.chosen_moved, "chosen": result.chosen, "decoder": config.decoder,
               "num_generations": config.num_generations, "transport_steps": config.transport_steps,
               "transport_step_size": config.transport_step_size,
               "likelihood_weight": likelihood_weight_for(config, self.scorer)}  # score = scorer + this x loglik/token
        if particles:
            vgf["particles"] = [asdict(p) for p in result.particles]
        body = ({"message": {"role": "assistant", "content": result.response}} if kind == "chat.completion"
                else {"text": result.response})
        finish = "length" if tokens >= config.max_completion_length else "stop"
        return {"index": index, **body, "logprobs": None, "finish_reason": finish, "vgf": vgf}, tokens

    def response(self, kind: str, config: SamplerConfig, results: list[SampleResult], prompt_tokens: int,
                 particles: bool) -> dict:
        choices, tokens = zip(*(self.choice(i, kind, config, r, particles) for i, r in enumerate(results)),
                              strict=True)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.name, "choices": list(choices),
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(tokens),
                          "total_tokens": prompt_tokens + sum(tokens)}}


async def read_body(request: Request, schema: type[BaseModel], limit: int) -> BaseModel:
    """The request body parsed by ``schema``, refused past ``limit`` bytes without reading it all."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"the request body is larger than this server's cap of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than this server's cap of {limit} bytes")
    try:
        return schema.model_validate_json(bytes(body))
    except ValidationError as err:
        raise APIError(400, *validation_message(err)) from None


def create_app(model, tokenizer, scorer, defaults: SamplerConfig | None = None, config: ServeConfig | None = None,
               *, sample_batch=None) -> FastAPI:
    """The server as a FastAPI app. ``sample_batch(config, prompts, seed) -> [SampleResult]`` runs one batch
    (default: ``batch_sampler``); pass a wrapper to watch or count the batches."""
    config = config or ServeConfig()
    service = VGFService(model, tokenizer, scorer, defaults or SamplerConfig(), config,
                         sample_batch or batch_sampler(model, tokenizer, scorer))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(service.sample_batch, config.batch_window_ms / 1000, config.max_batch_size)
        service.batcher.start()
        yield
        await service.batcher.stop()

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")

    app = FastAPI(title="vgf-llm serve", lifespan=lifespan)
    app.state.service = service
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        return error_response(400, str(err.errors()[0].get("msg", "invalid request")))

    @app.middleware("http")
    async def unexpected(request: Request, call_next):
        """Any other failure is a 500 in the same shape (the traceback goes to the server log, not the client)."""
        try:
            return await call_next(request)
        except Exception as err:  # noqa: BLE001
            logger.exception("request failed")
            return error_response(500, f"internal error ({type(err).__name__}); the server log has the details")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "vgf-llm"}]}

    @v1.post("/chat/completions")
    async def chat(request: Request):
        req = await read_body(request, ChatCompletionRequest, config.max_body_bytes)
        settings, results, prompt_tokens = await service.complete(req, [[m.as_dict() for m in req.messages]])
        return service.response("chat.completion", settings, results, prompt_tokens, req.return_particles)

    @v1.post("/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest, config.max_body_bytes)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        settings, results, prompt_tokens = await service.complete(req, prompts)
        return service.response("text_completion", settings, results, prompt_tokens, req.return_particles)

    app.include_router(v1)
    return app


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 30.0):
    """Run ``app`` with uvicorn in a thread on a free port of ``host``; yields its base URL, stops it on exit
    (for tests, notebooks and the load benchmark)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
