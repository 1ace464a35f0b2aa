"""`dsa-rag`: run the service and talk to it.

    dsa-rag serve                          # local Ray + embedded Redis + dsa-tiny; prints the URL
    dsa-rag serve --no-ray                 # the same API in one process (uvicorn), for development
    dsa-rag serve --config deploy/serve.yaml   # a Ray Serve config (applications, autoscaling, ...)
    dsa-rag serve --model /ckpt/DeepSeek-V3.2 --dtype bfloat16 --fp8-numerics   # a real checkpoint
    dsa-rag ingest report.pdf notes/       # upload files (directories: *.pdf *.txt *.md), progress bar
    dsa-rag ask "What was the 2023 revenue?"   # streams the answer, then the citations (a progress
                                           # bar on stderr while a cold pack is prefilled)
    dsa-rag status                         # readiness, replicas, documents, prefix-cache counters
    dsa-rag engine-server --model dsa-tiny --port 8100   # the engine alone, OpenAI /v1/completions

Also `python -m dsa_rag.rag_service.cli ...`. Settings come from DSA_RAG_* env vars (ServeSettings);
flags override them. Client commands talk to --url (default $DSA_RAG_URL or
http://127.0.0.1:8000) through the service client, rag_service/client.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx

from dsa_rag.rag_service.cli_progress import PrefillBars
from dsa_rag.rag_service.client import DSARagAPIError, DSARagClient
from dsa_rag.rag_service.serve.settings import ServeSettings

DOC_SUFFIXES = {".pdf", ".txt", ".md", ".markdown", ".text"}


def _default_url() -> str:
    return os.environ.get("DSA_RAG_URL", "http://127.0.0.1:8000").rstrip("/")


# ------------------------------------------------------------------ serve
def _settings(a):
    over = {k: v for k, v in {
        "host": a.host, "port": a.port, "model": a.model, "model_replicas": a.replicas,
        "data_dir": a.data_dir, "ray_address": a.address, "ray_num_cpus": a.num_cpus,
        "dtype": a.dtype, "fp8_numerics": a.fp8_numerics, "index_every": a.index_every,
        "tensor_parallel_size": a.tensor_parallel_size, "expert_parallel_size": a.expert_parallel_size,
    }.items() if v is not None}
    s = ServeSettings(**over)
    updates = {"data_dir": Path(s.data_dir).expanduser().resolve()}  # Ray workers have another cwd
    if s.port == 0:
        updates["port"] = _free_port(s.host)
    return s.model_copy(update=updates)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _announce(s) -> None:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
    print(f"dsa-rag serving on http://{host}:{s.port}  (OpenAPI: http://{host}:{s.port}/docs)", flush=True)


def cmd_serve(a) -> int:
    s = _settings(a)
    if a.no_ray:
        # The serving stack (torch, the engine, FastAPI; Ray below) loads only for `serve`: the
        # client commands stay fast to start and need none of it.
        import uvicorn

        from dsa_rag.rag_service.ask.local import LocalBackend
        from dsa_rag.rag_service.serve.app import create_app

        app = create_app(LocalBackend(s))
        config = uvicorn.Config(app, host=s.host, port=s.port, log_level="warning")
        server = uvicorn.Server(config)
        orig_startup = server.startup

        async def startup(sockets=None):
            await orig_startup(sockets)
            _announce(s)

        server.startup = startup
        server.run()
        return 0
    explicit = {k for k in ("host", "port", "model", "dtype", "fp8_numerics", "index_every",
                            "tensor_parallel_size", "expert_parallel_size")
                if getattr(a, k) is not None or f"DSA_RAG_{k.upper()}" in os.environ}
    return _serve_ray(s, a.config, explicit)


def _serve_ray(s, config_path: str | None, explicit: set[str] = frozenset()) -> int:
    import ray
    from ray import serve

    from dsa_rag.rag_service.stores.redis_store import open_redis

    redis_handle = None
    if not s.redis_url:  # embedded Redis, owned by this process, shared by every replica via its socket
        redis_handle = open_redis(s)
        s = s.model_copy(update={"redis_url": f"unix://{redis_handle.client.socket_file}"})
    relax_ray_health_checks()
    ray.init(address=s.ray_address, num_cpus=s.ray_num_cpus if not s.ray_address else None,
             include_dashboard=False, configure_logging=True, logging_level="WARNING")
    app_names = ["dsa-rag"]
    try:
        if config_path:
            app_names, s = _deploy_config(s, config_path, explicit)
        else:
            from dsa_rag.rag_service.serve.deployments import build_app

            serve.start(http_options={"host": s.host, "port": s.port})
            serve.run(build_app(s.model_dump(mode="json")), name="dsa-rag", route_prefix="/")
        _announce(s)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            for n in app_names:
                serve.delete(n)
            serve.shutdown()
        finally:
            ray.shutdown()
            if redis_handle is not None:
                redis_handle.close()
    return 0


def relax_ray_health_checks() -> None:
    """Ray Serve gives its HTTP proxy 5 s to report ready; on a loaded 2-core machine the first
    start (cold imports) can take longer, and Serve then kills the proxy and `serve.start` fails.
    Local clusters inherit this process's environment, so longer timeouts set here reach the
    controller. An explicit RAY_SERVE_* setting wins."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")


def _deploy_config(s, path: str, explicit: set[str]):
    """Deploy a Serve config file like `serve run` does; our apps get the runtime essentials
    (redis_url, an absolute data_dir) unless the config sets them. Host/port come from the
    config's http_options; --host/--port (or DSA_RAG_HOST/PORT) override them.
    -> (application names, settings with the host/port actually used)."""
    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(Path(path).read_text())
    http = cfg.setdefault("http_options", {})
    for k in ("host", "port"):
        if k in explicit or k not in http:
            http[k] = getattr(s, k)
    s = s.model_copy(update={"host": http["host"], "port": int(http["port"])})
    for app in cfg.get("applications", []):
        if app.get("import_path", "").startswith("dsa_rag.rag_service."):
            # the config's own args win, except what was given explicitly on the command line / env
            given = {k: getattr(s, k) for k in ("model", "dtype", "fp8_numerics", "index_every", "tensor_parallel_size",
                                                "expert_parallel_size") if k in explicit}
            app["args"] = {"redis_url": s.redis_url, "data_dir": str(s.data_dir), "app_name": app.get("name"),
                           **(app.get("args") or {}), **given}
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=True)
    names = [a.name for a in schema.applications]
    deadline = time.time() + 600
    while time.time() < deadline:
        st = serve.status().applications
        states = {n: st[n].status for n in names if n in st}
        if all(v == "RUNNING" for v in states.values()) and len(states) == len(names):
            break
        if any(v in ("DEPLOY_FAILED", "UNHEALTHY") for v in states.values()):
            raise SystemExit(f"deploying {path} failed: {[(n, st[n].message) for n in names if n in st]}")
        time.sleep(1)
    return names, s


# ------------------------------------------------------------------ client commands
def _client(a):
    """The service client (rag_service/client.py) for --url / --tenant / --api-key."""
    return DSARagClient(a.url, getattr(a, "api_key", None) or None, tenant=a.tenant, timeout=600)


def _fail(e) -> int:
    """An HTTP error (`DSARagAPIError`) -> one line on stderr, exit code 1."""
    print(f"error {e.status_code}: {e.message}", file=sys.stderr)
    return 1


def _expand(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DOC_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            print(f"skipping {p}: no such file", file=sys.stderr)
    return out


def cmd_ingest(a) -> int:
    from tqdm import tqdm

    files = _expand(a.paths)
    if not files:
        print("nothing to upload", file=sys.stderr)
        return 1
    failed = 0
    with _client(a) as c, tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                               desc="ingest", file=sys.stderr) as bar:
        for f in files:
            try:
                results = c.upload([(f.name, f.read_bytes())])["data"]
            except DSARagAPIError as e:
                results = [{"ok": False, "message": e.message}]
            bar.update(f.stat().st_size)
            for res in results:
                if res["ok"]:
                    d = res["document"]
                    bar.write(f"{d['id']}  {f}  ({d['pages']} pages, {d['tokens']} tokens)")
                else:
                    failed += 1
                    bar.write(f"FAILED {f}: {res['message']}")
    return 1 if failed else 0


def cmd_ask(a) -> int:
    opts = {"temperature": a.temperature, "max_tokens": a.max_tokens or None, "document_ids": a.document_id}
    with _client(a) as c:
        if a.no_stream:
            try:
                final = c.ask(a.question, **opts)
            except DSARagAPIError as e:
                return _fail(e)
            print(final["answer"])
        else:
            final, bars = None, PrefillBars()  # a progress bar while a cold pack is read (stderr)
            try:
                for ev in c.ask_stream(a.question, **opts):
                    bars.update(ev)
                    if ev["type"] == "token":
                        print(ev["text"], end="", flush=True)
                    elif ev["type"] == "citations":
                        final = ev
            except DSARagAPIError as e:
                if e.status_code is not None:  # refused before the stream began
                    return _fail(e)
                print(f"\nerror: {e.message}", file=sys.stderr)  # an error event, or the stream broke
                return 1
            finally:
                bars.close()
            print()
    if final:
        for i, ct in enumerate(final["citations"], 1):
            page = f" p.{ct['page']}" if ct.get("page") else ""
            snippet = ct["snippet"][:80].replace("\n", " ")
            print(f"[{i}] {ct['name']}{page} chars {ct['char_start']}-{ct['char_end']}: {snippet}")
        u = final["usage"]
        print(f"(prompt {u['prompt_tokens']} tokens, {u['cached_tokens']} cached, {u['completion_tokens']} generated, "
              f"{final['timings'].get('total_s', 0):.2f}s)", file=sys.stderr)
    return 0


def cmd_status(a) -> int:
    with _client(a) as c:
        try:
            h = c.ready()
        except Exception as e:  # noqa: BLE001
            print(f"{a.url}: not reachable ({e})", file=sys.stderr)
            return 1
        print(f"{a.url}: {h['status']}  " + ", ".join(f"{k}={v}" for k, v in h["checks"].items()))
        models = [m["id"] for m in c.models()]
        docs = c.list_documents()
        print(f"model: {', '.join(models)}   documents: {len(docs)}   tokens: {sum(d['tokens'] for d in docs)}")
        wanted = ("dsa_rag_model_replicas", "dsa_rag_queue_depth", "vllm:prefix_cache_hits_total",
                  "vllm:prefix_cache_queries_total", "dsa_rag_generation_tokens_total")
        for line in c.metrics().splitlines():
            if line.split(" ")[0] in wanted:
                print("  " + line)
    return 0 if h["status"] == "ok" else 1


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsa-rag", description="Long-document RAG on DeepSeek Sparse Attention")
    sub = p.add_subparsers(dest="command", required=True)

    sv = sub.add_parser("serve", help="start the service (prints the URL)")
    sv.add_argument("--host", help="listen address (default 127.0.0.1; DSA_RAG_HOST)")
    sv.add_argument("--port", type=int, help="port (default 8000; 0 = a free one; DSA_RAG_PORT)")
    sv.add_argument("--model", help="preset or checkpoint dir (default dsa-tiny)")
    sv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                    help="serving dtype of the model and its caches (default auto: the checkpoint's "
                         "torch_dtype on CUDA, float32 on CPU; DSA_RAG_DTYPE)")
    sv.add_argument("--fp8-numerics", action=argparse.BooleanOptionalAction, default=None,
                    help="V3.2's simulated FP8 indexer keys and latent cache (default: the model config's; "
                         "DSA_RAG_FP8_NUMERICS)")
    sv.add_argument("--index-every", type=int, metavar="N",
                    help="run the lightning indexer on every Nth layer and reuse its top-k in between "
                         "(default: the checkpoint's own plan; DSA_RAG_INDEX_EVERY)")
    sv.add_argument("--replicas", type=int, help="model replicas (default 1)")
    sv.add_argument("--tensor-parallel-size", type=int, metavar="N",
                    help="devices one replica's heads / dense MLP / vocabulary split over (default 1; needs Ray; "
                         "DSA_RAG_TENSOR_PARALLEL_SIZE)")
    sv.add_argument("--expert-parallel-size", type=int, metavar="N",
                    help="devices one replica's routed experts split over: 1 or the replica's size (default 1; "
                         "DSA_RAG_EXPERT_PARALLEL_SIZE)")
    sv.add_argument("--data-dir", help="blobs, KV cache, embedded Redis (default ./data)")
    sv.add_argument("--config", help="a Ray Serve config YAML (e.g. deploy/serve.yaml)")
    sv.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    sv.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    sv.add_argument("--no-ray", action="store_true", help="serve in one process (uvicorn), no Ray")
    sv.set_defaults(func=cmd_serve)

    def client_args(sp):
        sp.add_argument("--url", default=_default_url(), help="service URL (default $DSA_RAG_URL or http://127.0.0.1:8000)")
        sp.add_argument("--tenant", help="X-Tenant header (open mode only; with API keys the key picks the tenant)")
        sp.add_argument("--api-key", help="API key sent as Authorization: Bearer (default $DSA_RAG_API_KEY)")

    ing = sub.add_parser("ingest", help="upload documents (files or directories)")
    ing.add_argument("paths", nargs="+")
    client_args(ing)
    ing.set_defaults(func=cmd_ingest)

    ask = sub.add_parser("ask", help="ask a question (streams the answer)")
    ask.add_argument("question")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--document-id", action="append", help="restrict to this document (repeatable)")
    ask.add_argument("--no-stream", action="store_true")
    client_args(ask)
    ask.set_defaults(func=cmd_ask)

    st = sub.add_parser("status", help="readiness, replicas, documents, cache counters")
    client_args(st)
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plan", help="does a model fit a replica of N GPUs? weights per rank, cache per token, "
                                     "128k packs per replica (dsa_rag.model.plan)")
    pl.add_argument("--model", required=True,
                    help="a preset (deepseek-v3.2, glm-5, deepseek-v4-flash, ...) or a checkpoint dir")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs of one replica (default 8)")
    pl.add_argument("--gpu-mem", type=float, default=141.0, help="GB per GPU (H200 141, H100 80)")
    pl.add_argument("--tp", type=int, help="tensor parallel size (default: --gpus)")
    pl.add_argument("--ep", type=int, help="expert parallel size (default: --gpus for MoE models)")
    pl.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                    help="bf16: as this engine loads them (FP8 dequantized); fp8: FP8-resident weights")
    pl.add_argument("--dtype", help="serving dtype (default: the checkpoint's)")
    pl.add_argument("--fp8-numerics", action="store_true", help="FP8 indexer-key cache (V3.2's kernels)")
    pl.add_argument("--reserve-frac", type=float, default=0.1, help="GPU share kept for activations")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    es = sub.add_parser("engine-server", add_help=False,
                        help="this project's engine alone behind an OpenAI-compatible /v1/completions (an "
                             "upstream for `engine: openai`); flags: `dsa-rag engine-server --help`")
    es.add_argument("args", nargs=argparse.REMAINDER)  # listed in --help; main() hands its flags to the server
    return p


def cmd_engine_server(argv: list[str]) -> int:
    # Imported here, not at the top: the server pulls in torch and the engine (like `plan`), and
    # parses its own flags (model/engine/server.py).
    from dsa_rag.model.engine.server import main as engine_server_main

    return engine_server_main(argv)


def cmd_plan(a) -> int:
    # Imported here, not at the top: it pulls in torch and the model, which no other command needs.
    from dsa_rag.model.plan import run

    return run(a)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["engine-server"]:
        return cmd_engine_server(argv[1:])
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - client commands: one line, not a traceback
        if isinstance(e, DSARagAPIError):
            print(f"error{f' {e.status_code}' if e.status_code else ''}: {e.message}", file=sys.stderr)
            return 1
        if isinstance(e, httpx.TransportError):
            print(f"cannot reach {getattr(a, 'url', 'the service')}: {e}; is `dsa-rag serve` running? "
                  "(--url / DSA_RAG_URL)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
