"""This project's engine served alone as an OpenAI-compatible `/v1/completions` upstream, the way
vLLM or SGLang serve a model: token-id or text prompts, SSE streaming, per-token log-probs,
automatic prefix caching (model/engine/prefix_cache.py) reported as
`usage.prompt_tokens_details.cached_tokens`. It is what the service's `engine: openai` backend
(model/engine/upstream.py) talks to in tests and benchmarks, and a way to run the model without
the RAG service.

    dsa-rag engine-server --model dsa-tiny --port 8100                   # prints "engine-server on http://..."
    python -m dsa_rag.model.engine.server --model /ckpt/tiny --port 0    # the same, a free port
    curl -s localhost:8100/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "dsa-tiny", "prompt": [0, 11, 12], "max_tokens": 8, "stream": true}'

Request fields (OpenAI / vLLM): model, prompt (str | token ids | a list of one of them), max_tokens
(default 16), temperature, top_p, seed, stop, stream, stream_options.include_usage, logprobs (int:
the sampled token's log-prob; top alternatives are not computed), return_tokens_as_token_ids (vLLM:
logprobs.tokens as "token_id:N"). n > 1 and echo are refused (400). A text prompt is encoded with
the checkpoint's tokenizer, <bos> first, as HF tokenizers do with special tokens on.

Test knobs (used by tests/service/test_upstream.py): `--token-delay-s X` sleeps X s before each
token (a slow upstream); `--max-running N` answers 503 + Retry-After above N requests in flight
(back-pressure as a gateway in front of vLLM would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dsa_rag.model.engine.factory import load_engine
from dsa_rag.model.engine.prefix_cache import PrefixCache
from dsa_rag.model.engine.sampling import SamplingParams
from dsa_rag.model.tokenizer import load_tokenizer

MAX_LOGPROBS = 5


class RequestError(ValueError):
    """A bad request: 400 with an OpenAI-style error body."""


def _error(status: int, message: str, type_: str = "invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "code": status}}, status_code=status,
                        headers=headers)


def prompt_ids(prompt, tok, vocab: int) -> list[int]:
    """The request's prompt -> token ids (one prompt: a str or a list of ints, maybe wrapped in a list)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty")
        return [tok.bos_id] + tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return list(prompt)
    raise RequestError("prompt must be a non-empty string or list of token ids (one prompt per request)")


def sampling_of(body: dict) -> SamplingParams:
    if int(body.get("n") or 1) != 1:
        raise RequestError("n > 1 is not supported by this server")
    if body.get("echo"):
        raise RequestError("echo is not supported by this server")
    stop = body.get("stop") or ()
    try:
        temp = body.get("temperature")
        return SamplingParams(max_tokens=int(body.get("max_tokens") or 16),
                              temperature=1.0 if temp is None else float(temp),  # OpenAI's default
                              top_p=float(body.get("top_p") or 1.0), seed=body.get("seed"),
                              stop=(stop,) if isinstance(stop, str) else tuple(stop), logprobs=True)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None


class EngineServer:
    """The engine, its prefix cache and the request bookkeeping behind the routes."""

    def __init__(self, model: str, served_name: str | None = None, *, device: str | None = None,
                 dtype: str = "auto", threads: int | None = None, cache_entries: int = 8,
                 token_delay_s: float = 0.0, max_running: int = 0):
        self.tok = load_tokenizer(model if Path(model).is_dir() else None)
        self.engine = load_engine(model, device=device, tokenizer=self.tok, threads=threads, dtype=dtype)
        self.cache = PrefixCache(self.engine, max_entries=cache_entries)
        self.name = served_name or (Path(model).name if Path(model).is_dir() else model)
        self.vocab = getattr(self.engine.engine, "cfg").vocab_size
        self.token_delay_s, self.max_running = token_delay_s, max_running
        self.running = 0
        self.created = int(time.time())

    def token_str(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.tok.decode([token_id], skip_special=False)

    async def events(self, ids: list[int], params: SamplingParams):
        """(cached tokens, then every TokenEvent). Prompt positions beyond the model's context: ValueError."""
        lease = await self.cache.lease(ids)
        try:
            yield lease.cached
            async for ev in self.engine.generate(lease.rest, params, prefix=lease.prefix):
                if self.token_delay_s and ev.token_id >= 0:
                    await asyncio.sleep(self.token_delay_s)
                yield ev
        finally:
            await lease.close()


def create_app(srv: EngineServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        await srv.cache.clear()
        srv.engine.close()

    app = FastAPI(title="dsa-rag engine server", lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "dsa-rag"}]}

    @app.get("/metrics")
    async def metrics():  # vLLM's names, so prefix-cache dashboards read it
        s = srv.cache.stats
        return JSONResponse({"vllm:prefix_cache_queries": s["query_tokens"], "vllm:prefix_cache_hits": s["hit_tokens"],
                             "requests": s["queries"], "num_requests_running": srv.running})

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            if body.get("model") not in (None, srv.name):
                return _error(404, f"the model `{body.get('model')}` does not exist; this server serves {srv.name!r}",
                              "NotFoundError")
            ids = prompt_ids(body.get("prompt"), srv.tok, srv.vocab)
            params = sampling_of(body)
            want_lp = body.get("logprobs") is not None
            if want_lp and not 0 <= int(body["logprobs"]) <= MAX_LOGPROBS:
                raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        except (RequestError, json.JSONDecodeError, TypeError, ValueError) as e:
            return _error(400, str(e))
        if srv.max_running and srv.running >= srv.max_running:
            return _error(503, f"server busy: {srv.running} requests running (max {srv.max_running}); retry later",
                          "ServiceUnavailable", headers={"Retry-After": "1"})
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": srv.name}
        srv.running += 1
        gen = srv.events(ids, params)
        try:
            cached = await gen.__anext__()  # the prefix lookup / prefill happens here
        except ValueError as e:
            srv.running -= 1
            await gen.aclose()
            return _error(400, str(e))
        except BaseException:
            srv.running -= 1
            await gen.aclose()
            raise

        def usage(n_out: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out,
                    "prompt_tokens_details": {"cached_tokens": cached}}

        def lp_of(ev) -> dict | None:
            if not want_lp or ev.token_id < 0:
                return None
            t = srv.token_str(ev.token_id, as_ids)
            return {"tokens": [t], "token_logprobs": [ev.logprob], "top_logprobs": [{t: ev.logprob}],
                    "text_offset": [0]}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse():
                n_out, finish = 0, None
                try:
                    async for ev in gen:
                        if ev.token_id < 0 and ev.finish_reason == "error":
                            err = {"message": ev.error or "engine error", "type": "InternalServerError", "code": 500}
                            yield f"data: {json.dumps({'error': err})}\n\n"  # vLLM's in-stream error
                            break
                        n_out += ev.token_id >= 0
                        finish = ev.finish_reason if ev.finished else None
                        choice = {"index": 0, "text": ev.text, "logprobs": lp_of(ev), "finish_reason": finish}
                        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
                        if ev.finished:
                            break
                    if include_usage:
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(n_out)})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    srv.running -= 1
                    await gen.aclose()

            return StreamingResponse(sse(), media_type="text/event-stream")

        try:
            text, lps, toks, finish, err = [], [], [], None, None
            async for ev in gen:
                if ev.token_id < 0:
                    err = ev.error if ev.finish_reason == "error" else None
                    finish = ev.finish_reason
                    break
                text.append(ev.text)
                toks.append(srv.token_str(ev.token_id, as_ids))
                lps.append(ev.logprob)
                if ev.finished:
                    finish = ev.finish_reason
                    break
        finally:
            srv.running -= 1
            await gen.aclose()
        if err:
            return _error(500, err, "InternalServerError")
        logprobs = ({"tokens": toks, "token_logprobs": lps, "top_logprobs": [{t: lp} for t, lp in zip(toks, lps)],
                     "text_offset": []} if want_lp else None)
        return {**head, "choices": [{"index": 0, "text": "".join(text), "logprobs": logprobs,
                                     "finish_reason": finish}], "usage": usage(len(toks))}

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dsa-tiny", help="preset or checkpoint dir (default dsa-tiny)")
    p.add_argument("--served-model-name", help="the id /v1/models reports (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100, help="0 = a free port")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--prefix-cache-entries", type=int, default=8, help="prefilled prompts kept for reuse (LRU)")
    p.add_argument("--token-delay-s", type=float, default=0.0, help="test knob: sleep this long before each token")
    p.add_argument("--max-running", type=int, default=0, help="503 above this many requests in flight (0 = no limit)")


def run(a) -> int:
    import uvicorn

    srv = EngineServer(a.model, a.served_model_name, device=a.device, dtype=a.dtype, threads=a.threads,
                       cache_entries=a.prefix_cache_entries, token_delay_s=a.token_delay_s, max_running=a.max_running)
    server = uvicorn.Server(uvicorn.Config(create_app(srv), host=a.host, port=a.port, log_level="warning"))
    orig = server.startup

    async def startup(sockets=None):
        await orig(sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else a.port
        print(f"engine-server on http://{a.host}:{port} serving {srv.name}", flush=True)

    server.startup = startup
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsa-rag engine-server", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
