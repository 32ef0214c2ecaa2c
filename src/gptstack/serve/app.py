"""`gptstack serve RUN`: web chat, side-by-side compare and preference labeling for a run.

    gptstack serve runs/demo                                  # http://127.0.0.1:8000
    gptstack serve runs/demo --port 8080 --token s3cret --set serve.k=3
    # then open http://127.0.0.1:8080/#token=s3cret (the fragment never reaches a server log)

    from gptstack.serve.app import create_app                 # the ASGI app, e.g. for TestClient
    app = create_app("runs/demo", config, token=None)

One static page (static/index.html + app.js + app.css; no build step) with three views:
  Chat     any language model of the run, tokens streamed as they are sampled, multi-turn
  Compare  one prompt, two stages side by side, with the gold reward (world prompts) and the
           score of RUN/rm (when there is one)
  Label    K sampled responses to a prompt of the prompt set; rank them (keys 1..K, or click),
           or mark all bad / skip; progress, undo, and the annotator's agreement with gold

API (JSON bodies, validated by pydantic: a bad one gets 422 naming the field; a body over
serve.max_body_bytes gets 413 before it is read; a label the disk cannot take gets 507 (full) or
503 (read-only) and is not stored; there is no /docs or /openapi.json, this list is the schema):
  GET  /api/health                     200 {"ok": true}, never needs the token
  GET  /api/info                       stages (language models and scalar heads), settings, and the
                                       sampling defaults (the config's `sampling` section)
  POST /api/chat                       {stage, messages, temperature, top_k, top_p, max_new_tokens, seed}
                                       (a sampling field left out takes the `sampling` section's value)
                                       -> text/event-stream: "token" events {"text"}, then "done"
                                       {"text", "finished"} (or "error" {"detail"}); the oldest turns
                                       that do not fit the context are dropped (the system message
                                       never), and 422 says which message is too long when even the
                                       last one does not fit
  POST /api/compare                    {prompt, stages: [a, b], sampling} -> per stage text, gold, rm
  GET  /api/world/prompt               a held-out world prompt to compare on
  POST /api/label/next                 {annotator}: their next item, prompt + responses (sampled when
                                       none waits; a POST, since it may sample and store)
  POST /api/label                      {item_id, annotator, status, ranking, responses}; a ranking
                                       that is not a permutation of the responses shown gets 422
  POST /api/label/undo                 {annotator}: the last label is undone, its item comes back
  GET  /api/label/stats?annotator=A    progress and agreement with gold

Safe defaults: binds 127.0.0.1; with a loopback bind only a Host header that is exactly a loopback
name with an optional port is served (a DNS-rebinding page cannot reach the API); whatever changes
state is a POST with a JSON body, which a cross-site page cannot send without a CORS preflight
(never granted); with --token every request needs `Authorization: Bearer TOKEN` (401 otherwise)
but the page, its static files and /api/health (a browser cannot send a header when it opens a
page: the page holds no data and asks for the token); every
response carries a Content-Security-Policy without inline script, and the page writes model text
only through textContent, so `<script>` in a response is shown, never run.

One model call runs at a time (a lock): on a CPU torch already uses every core, and the label
store is SQLite in WAL mode (store.py), safe for any number of concurrent requests.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, field_validator

from .. import world
from ..common import UserError
from ..data.feedback import FILENAME, Conflict, DiskFull, FeedbackStore, Invalid, Item, NotFound, Unwritable

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# --- request bodies ------------------------------------------------------------------------------

Annotator = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64,
                                             pattern=r"^[^\x00-\x1f\x7f]+$")]
StageName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class Sampling(BaseModel):
    """The sampling fields of a chat or compare request: one left out (or null) takes the config's
    `sampling` section (`with_defaults`), the same defaults `gptstack chat` and `sample` use."""
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(None, ge=0, le=10, description="0 = greedy")
    top_k: int | None = Field(None, ge=0, description="0 = off")
    top_p: float | None = Field(None, gt=0, le=1, description="1 = off")
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, lt=2**63)

    def with_defaults(self, sampling):
        """This request with each sampling field it left out taken from `sampling` (cfg.sampling)."""
        return self.model_copy(update={name: getattr(sampling, name) for name in Sampling.model_fields
                                       if getattr(self, name) is None})


class ChatRequest(Sampling):
    stage: StageName
    messages: list[Message] = Field(min_length=1, max_length=200)

    @field_validator("messages")
    @classmethod
    def ends_with_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user" or not messages[-1].content.strip():
            raise ValueError("the last message must be a non-empty user turn")
        return messages


class CompareRequest(Sampling):
    prompt: str = Field(min_length=1, max_length=20_000)
    stages: list[StageName] = Field(min_length=1, max_length=4)


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StrictInt = Field(ge=1)
    annotator: Annotator
    status: Literal["ranked", "all_bad", "skipped"] = "ranked"
    # strict: true, "0" or 2.0 is not an index (lax parsing would turn [true, 0, 2] into a ranking)
    ranking: list[StrictInt] | None = Field(None, max_length=64, description="response indices, best first")
    responses: list[str] | None = Field(None, description="the responses as shown (checked against the item)")


class AnnotatorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    annotator: Annotator


# --- the run: its models, prompt set and store ----------------------------------------------------


class Run:
    """A run directory's models (loaded on first use), tokenizer, label prompt set and store."""

    def __init__(self, run_dir: str | Path, cfg):
        from ..tokenizer import Tokenizer

        self.dir = Path(run_dir)
        self.cfg = cfg
        if not self.dir.is_dir():
            raise UserError(f"{self.dir}: no such run directory")
        if not (self.dir / "tokenizer" / "gptstack.json").exists():
            raise UserError(f"{self.dir}/tokenizer: no tokenizer here (expected RUN/tokenizer/gptstack.json)")
        self.tokenizer = Tokenizer.load(self.dir / "tokenizer")
        self.stages = self._find_stages()
        if not any(kind == "lm" for kind in self.stages.values()):
            raise UserError(f"{self.dir}: no language model in this run (expected RUN/<stage>/model.safetensors)")
        s = cfg.serve
        for key in ("k", "num_prompts", "batch", "max_new_tokens", "max_body_bytes"):
            if getattr(s, key) < (2 if key == "k" else 1):
                raise UserError(f"serve.{key}: expected at least {2 if key == 'k' else 1}, got {getattr(s, key)}")
        if not 0 < s.top_p <= 1 or s.temperature < 0 or s.top_k < 0:
            raise UserError("serve.temperature >= 0, serve.top_k >= 0 and 0 < serve.top_p <= 1 expected, got "
                            f"{s.temperature}, {s.top_k}, {s.top_p}")
        self.prompts, self.tasks, self.source = self._prompt_set()
        self.store = FeedbackStore(self.dir / FILENAME)
        self.lock = threading.Lock()  # one model call at a time (see the module docstring)
        self._models: dict[str, object] = {}
        self._loading = threading.Lock()

    def _find_stages(self) -> dict[str, str]:
        from ..rundir import scalar_kind

        out = {}
        for d in sorted(p for p in self.dir.iterdir() if (p / "model.safetensors").is_file()):
            out[d.name] = scalar_kind(d) or "lm"
        return out

    def _prompt_set(self) -> tuple[list[list[dict]], list, str]:
        """(prompts as messages, the world task of each or None, source name)."""
        s = self.cfg.serve
        if s.prompts == "world":
            tasks = world.train_tasks(s.num_prompts, seed=s.seed, config=self.cfg.world)
            return [[{"role": "user", "content": t.prompt}] for t in tasks], list(tasks), "world"
        from ..data.formats import read_dataset

        prompts = read_dataset(s.prompts).prompts()
        if not prompts:
            raise UserError(f"serve.prompts {s.prompts}: no usable prompts in this file")
        return prompts, [_world_task(p[-1]["content"]) for p in prompts], s.prompts

    def language_model(self, stage: str):
        from ..rundir import check_vocab, load_model

        kind = self.stages.get(stage)
        if kind is None:
            raise NotFound(f"no stage {stage!r} in {self.dir}; language models here: "
                           f"{', '.join(n for n, k in self.stages.items() if k == 'lm')}")
        if kind != "lm":
            raise Invalid(f"stage {stage!r} is a {kind} model (a scalar head), not a language model")
        with self._loading:
            if stage not in self._models:
                model, _ = load_model(self.dir / stage)
                check_vocab(model.config.vocab_size, self.tokenizer, self.dir / stage)
                self._models[stage] = model.eval()
            return self._models[stage]

    def reward_model(self):
        """RUN/rm's reward model, or None when the run has none."""
        from ..rundir import load_scalar_model
        from ..rundir import check_vocab

        if self.stages.get("rm") != "reward":
            return None
        with self._loading:
            if "rm" not in self._models:
                rm, _ = load_scalar_model(self.dir / "rm", "reward")
                check_vocab(rm.config.vocab_size, self.tokenizer, self.dir / "rm")
                self._models["rm"] = rm.eval()
            return self._models["rm"]

    def rm_score(self, history: list[dict], reply: str, finished: bool) -> float | None:
        """RUN/rm's score of a reply, read at its <|assistant_end|> (its last token when cut off),
        rendered as the RM was trained (`render_for_rm`; a model's own template may write more after
        its end-of-turn token)."""
        import torch

        from ..engine.scoring import render_for_rm

        rm = self.reward_model()
        if rm is None:
            return None
        ids = render_for_rm(self.tokenizer, history, reply, finished, rm.config.block_size)
        with torch.inference_mode():
            return float(rm.score(torch.tensor([ids]))[0])

    def sample_items(self, annotator: str) -> Item | None:
        """Sample K responses to the next `serve.batch` prompts of the prompt set and store them as
        the annotator's items; identical and empty responses are dropped (nothing to rank between
        them), and so are prompts left with fewer than two. Call with self.lock held."""
        from ..engine import generate

        s = self.cfg.serve
        model = self.language_model(s.stage)
        tok, ends = self.tokenizer, self.tokenizer.turn_end_ids
        start = self.store.next_prompt_index()
        for _attempt in range(4):
            indices = list(range(start, start + s.batch))
            picked = [(i, self.prompts[i % len(self.prompts)], self.tasks[i % len(self.prompts)]) for i in indices]
            picked = [(i, p, t) for i, p, t in picked
                      if len(tok.render_prompt(p)) + min(s.max_new_tokens, 8) <= model.config.block_size]
            # the seed moves with the prompt index, so a second pass over the prompt set samples anew
            out = generate(model, [tok.render_prompt(p) for _, p, _ in picked], s.max_new_tokens, n=s.k,
                           temperature=s.temperature, top_k=s.top_k or None,
                           top_p=s.top_p if s.top_p < 1 else None, stop_ids=ends, seed=s.seed * 1_000_003 + start)
            items = []
            for (i, prompt, task), completions in zip(picked, out):
                texts, finished = [], []
                for c in completions:
                    text = tok.decode([t for t in c.tokens if t not in ends]).strip()
                    if text and text not in texts:
                        texts.append(text)
                        finished.append(c.finished)
                if len(texts) >= 2:
                    gold = [world.gold(task, t, f) for t, f in zip(texts, finished)] if task is not None else None
                    items.append(Item(prompt, texts, finished, gold, i))
            if items:
                return self.store.add_items(annotator, items, model=s.stage, source=self.source)[0]
            start += s.batch
        return None

    def info(self) -> dict:
        s = self.cfg.serve
        lms = [n for n, k in self.stages.items() if k == "lm"]
        return {"run": str(self.dir), "stages": self.stages, "language_models": lms,
                "default_stage": next((n for n in ("ppo", "grpo", "dpo", "sft") if n in lms), lms[-1]),
                "label": {"stage": s.stage, "available": self.stages.get(s.stage) == "lm", "k": s.k,
                          "prompts": self.source, "prompt_set_size": len(self.prompts),
                          "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                          "max_new_tokens": s.max_new_tokens},
                "sampling": dataclasses.asdict(self.cfg.sampling),  # the chat and compare views' defaults
                "rm": self.stages.get("rm") == "reward"}


# host[:port], nothing else: no userinfo, path, fragment or empty port, so no prefix of a hostile
# name ("localhost.evil.com", "localhost@evil.com", "[::1]x") can pass for the loopback
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


def _host_name(header: str) -> str | None:
    """The host of a Host header, lower-cased and without the port ("[::1]:8000" -> "[::1]");
    None when the header is not exactly host[:port]. Any port passes: what DNS rebinding changes
    is the name, and a port forward (ssh -L 9000:localhost:8000) changes the port."""
    m = _HOST.fullmatch(header)
    if m is None or (m[2] is not None and not 0 < int(m[2]) < 65536):
        return None
    return m[1].lower()


def _public(path: str) -> bool:
    """Served without the token: the page and its static files (a browser cannot send a header
    when it opens a page; they hold no data) and the health check. Everything else, unknown
    paths included, needs it."""
    return path in ("/", "/api/health") or path.startswith("/static/")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it, by
    its Content-Length when it has one, else (chunked) by counting the bytes as they arrive.
    The body read is handed on unchanged."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away; the app hears it
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body over the limit of {self.limit} bytes "
                                           "(serve.max_body_bytes): send less, or raise the limit"},
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _world_task(text: str):
    try:
        return world.task_from_prompt(text)
    except UserError:
        return None


# --- the app ---------------------------------------------------------------------------------------


def create_app(run_dir: str | Path, cfg, token: str | None = None,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The ASGI app for a run. `token`: required on every request but the page, its static files
    and /api/health. `allowed_hosts`: Host header names served (None = any); `serve()` passes the
    loopback names for a loopback bind."""
    run = Run(run_dir, cfg)
    app = FastAPI(title="gptstack serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.run = run
    # added before the guard, so it runs inside it: a request the guard refuses is never read
    app.add_middleware(BodyLimit, limit=cfg.serve.max_body_bytes)
    allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed is not None:
            given = request.headers.getlist("host")
            host = _host_name(given[0]) if len(given) == 1 else None
            if host is None:
                return JSONResponse({"detail": f"malformed Host header {given!r}: expected host[:port]"},
                                    status_code=400)
            if host not in allowed:
                return JSONResponse({"detail": f"host {host!r} not served (this server answers to "
                                               f"{', '.join(allowed_hosts)})"}, status_code=421)
        path = request.scope["path"]
        if token is not None and not _public(path):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong token: send `Authorization: Bearer TOKEN` "
                                               "(the --token the server was started with)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        summary = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors],
                             "error": summary}, status_code=422)

    for exc_type, status in ((NotFound, 404), (Conflict, 409), (Invalid, 422), (UserError, 422),
                             (DiskFull, 507), (Unwritable, 503)):
        app.add_exception_handler(exc_type, _error_handler(status))

    # --- page ------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.get("/api/info")
    def info():
        return run.info()

    # --- chat ------------------------------------------------------------------------------------

    @app.post("/api/chat")
    async def chat(req: ChatRequest):
        from ..engine.chat import fit_history, stream_reply

        req = req.with_defaults(run.cfg.sampling)
        messages = [m.model_dump() for m in req.messages]

        def prepare():
            model = run.language_model(req.stage)
            return model, fit_history(run.tokenizer, messages, req.max_new_tokens, model.config.block_size, req.stage)

        model, history = await run_in_threadpool(prepare)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, data: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

        def work() -> None:
            try:
                t0 = time.perf_counter()
                with run.lock:
                    reply, finished = stream_reply(
                        model, run.tokenizer, history, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                        top_k=req.top_k, top_p=req.top_p, seed=req.seed, should_stop=stop.is_set,
                        on_text=lambda piece: put("token", {"text": piece}))
                put("done", {"text": reply, "finished": finished, "stage": req.stage,
                             "seconds": round(time.perf_counter() - t0, 3),
                             "dropped_messages": len(messages) - len(history)})
            except Exception as e:  # reported in the stream: the 200 header is already sent
                put("error", {"detail": str(e)})

        threading.Thread(target=work, name="gptstack-chat", daemon=True).start()

        async def events():
            try:
                while True:
                    kind, data = await queue.get()
                    yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                    if kind != "token":
                        return
            finally:
                stop.set()  # the client went away: the sampler stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # --- compare ---------------------------------------------------------------------------------

    @app.post("/api/compare")
    def compare(req: CompareRequest):
        from ..engine.chat import fit_history, stream_reply

        req = req.with_defaults(run.cfg.sampling)
        history = [{"role": "user", "content": req.prompt.strip()}]
        task = _world_task(req.prompt)
        results = []
        with run.lock:
            for stage in req.stages:
                model = run.language_model(stage)
                fitted = fit_history(run.tokenizer, history, req.max_new_tokens, model.config.block_size, stage)
                reply, finished = stream_reply(model, run.tokenizer, fitted, max_new_tokens=req.max_new_tokens,
                                               temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                               seed=req.seed)
                gold = world.score(task, reply, finished) if task is not None else None
                results.append({"stage": stage, "text": reply, "finished": finished,
                                "gold": None if gold is None else gold.score,
                                "correct": None if gold is None else gold.correct,
                                "rm": run.rm_score(history, reply, finished)})
        return {"prompt": req.prompt, "world": task is not None,
                "answer": None if task is None else str(task.answer), "results": results}

    @app.get("/api/world/prompt")
    def world_prompt(seed: Annotated[int | None, Query(ge=0)] = None):
        tasks = world.eval_set(run.cfg.world)  # held out: no stage ever trained on these
        task = random.Random(seed).choice(tasks)
        return {"prompt": task.prompt, "family": task.family, "difficulty": task.difficulty}

    # --- label -----------------------------------------------------------------------------------

    @app.post("/api/label/next")
    def label_next(req: AnnotatorRequest):
        annotator = req.annotator
        if run.stages.get(run.cfg.serve.stage) != "lm":
            raise Invalid(f"serve.stage {run.cfg.serve.stage!r}: no such language model in {run.dir} to sample "
                          "label responses from; pass --set serve.stage=NAME")
        item = run.store.next_item(annotator)
        if item is None:
            with run.lock:
                item = run.store.next_item(annotator) or run.sample_items(annotator)
        if item is None:
            raise HTTPException(503, "the model gave fewer than two distinct responses to every prompt tried; "
                                     "raise serve.temperature or serve.k")
        return {**item.public(), "stats": stats(run, annotator)}

    @app.post("/api/label")
    def label(req: LabelRequest):
        label_id = run.store.label(req.item_id, req.annotator, req.status, req.ranking, req.responses)
        return {"label_id": label_id, "stats": stats(run, req.annotator)}

    @app.post("/api/label/undo")
    def undo(req: AnnotatorRequest):
        return {"undone": run.store.undo(req.annotator), "stats": stats(run, req.annotator)}

    @app.get("/api/label/stats")
    def label_stats(annotator: Annotated[Annotator, Query()]):
        return stats(run, annotator)

    return app


def stats(run: Run, annotator: str) -> dict:
    return {**run.store.stats(annotator), "prompt_set_size": len(run.prompts)}


def _error_handler(status: int):
    async def handle(request: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, status_code=status)
    return handle


def serve(run_dir: str | Path, cfg, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Run the app with uvicorn until interrupted (`gptstack serve`)."""
    import sys

    import torch
    import uvicorn

    if cfg.serve.threads:
        torch.set_num_threads(cfg.serve.threads)
    loopback = host in LOOPBACK_HOSTS or host.startswith("127.")
    app = create_app(run_dir, cfg, token=token, allowed_hosts=(*LOOPBACK_HOSTS, host) if loopback else None)
    if not loopback and token is None:
        print(f"warning: serving on {host} without --token: anyone who can reach this port can read the run's "
              "models and write labels", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"gptstack serve: http://{shown}:{port}/" + (f"#token={token}" if token else "")
          + f"  (labels go to {Path(run_dir) / FILENAME}; Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
