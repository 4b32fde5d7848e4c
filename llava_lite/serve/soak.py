"""Soak test: N concurrent clients against `llava-lite serve` for M minutes.

    python -m llava_lite.serve.soak --clients 8 --minutes 10 --out runs/soak

Starts its own server (or uses --url), mixes browser-API (gradio_client) and OpenAI-API
requests over easy-VQA test images, then reports requests served, errors, p50/p95 latency
and the server's memory over time (with its trend), as JSON, markdown and a PNG. It scrapes
/health and /metrics every 5 s and checks that the server's counters agree with its own.
`--auth` gives every client its own API key (and the browser clients a login);
`--rate-limit-rpm/--rate-limit-concurrent` turn per-key limits on (a 429 is waited out, as
its Retry-After says, and counted, not an error).
`--throughput` instead runs one client and then N clients, OpenAI API only, asking for a
detailed description (max_tokens 64), and prints each phase's aggregate tokens/s and the ratio.
Not part of CI: it runs for minutes by design.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llava_lite.cli", "serve", "--port", str(port), "--quantize", args.quantize,
           "--concurrency", str(args.concurrency)]
    if args.model:
        cmd += ["--model", args.model]
    if args.auth:
        keys = log_path.with_name("soak-keys.txt")
        keys.write_text("".join(k + "\n" for k in args.keys))
        cmd += ["--api-key-file", str(keys), "--auth", ":".join(args.login)]
    if args.rate_limit_rpm:
        cmd += ["--rate-limit-rpm", str(args.rate_limit_rpm)]
    if args.rate_limit_concurrent:
        cmd += ["--rate-limit-concurrent", str(args.rate_limit_concurrent)]
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log_path}")
        log.seek(0)
        found = re.search(r"llava-lite chat on (http://\S+)", log.read())
        if found:
            return proc, found.group(1).rstrip("/")
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not start in 300 s; see {log_path}")


def _client(worker: int, url: str, items: list[dict], stop: float, results: list, lock: threading.Lock,
            args) -> None:
    from gradio_client import Client, handle_file
    from openai import OpenAI, RateLimitError

    rng = random.Random(worker)
    gradio = Client(url, verbose=False, auth=tuple(args.login) if args.auth else None)
    key = args.keys[worker % len(args.keys)] if args.auth else "unused"
    openai = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    turns = 0
    while time.time() < stop:
        item = rng.choice(items)
        via = "openai" if args.throughput or rng.random() < 0.5 else "gradio"
        if via == "gradio":
            # A browser session keeps its history; like a user, start a new chat every few turns.
            if turns == 3:
                gradio.reset_session()
                turns = 0
            turns += 1
        t = time.perf_counter()
        error, limited, tokens = "", False, 0
        try:
            if via == "gradio":
                reply = gradio.predict(message={"text": item["question"], "files": [handle_file(item["image"])]},
                                       api_name="/chat")
                if reply.startswith("⚠️"):
                    error = reply
            else:
                uri = "data:image/png;base64," + base64.b64encode(Path(item["image"]).read_bytes()).decode()
                content = [{"type": "image_url", "image_url": {"url": uri}},
                           {"type": "text", "text": args.prompt or item["question"]}]
                out = openai.chat.completions.create(model="llava-lite", max_tokens=args.max_tokens,
                                                     messages=[{"role": "user", "content": content}])
                reply, tokens = out.choices[0].message.content, out.usage.completion_tokens
        except RateLimitError as err:  # expected when a limit is set: wait as the server says
            limited, reply = True, ""
            time.sleep(float(err.response.headers.get("retry-after", "1")))
        except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the soak
            error, reply = f"{type(err).__name__}: {err}"[:200], ""
        with lock:
            results.append({"t": time.time(), "via": via, "latency_s": time.perf_counter() - t, "error": error,
                            "rate_limited": limited, "tokens": tokens,
                            "correct": reply.strip(" .").lower() == item["answer"]})


PREFILL_COUNTERS = {"llava_lite_prefill_passes_total": "prefill_passes",
                    "llava_lite_prefill_requests_total": "prefill_requests",
                    "llava_lite_prefill_tokens_total": "prefill_tokens",
                    "llava_lite_prompt_cache_reused_tokens_total": "reused_tokens"}


def scrape(url: str) -> dict[str, float]:
    """The server's own counts from /metrics (and readiness from /health), summed over labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as res:
        text = res.read().decode()
    counts = {"api_requests": 0.0, "api_429": 0.0, "generations": 0.0, "tokens": 0.0}
    counts |= dict.fromkeys(PREFILL_COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llava_lite_requests_total" and sample.labels["route"] == "/v1/chat/completions":
                counts["api_requests"] += sample.value
                counts["api_429"] += sample.value if sample.labels["status"] == "429" else 0
            elif sample.name == "llava_lite_generations_total":
                counts["generations"] += sample.value
            elif sample.name == "llava_lite_generated_tokens_total":
                counts["tokens"] += sample.value
            elif sample.name in PREFILL_COUNTERS:
                counts[PREFILL_COUNTERS[sample.name]] += sample.value
    with urllib.request.urlopen(f"{url}/health", timeout=30) as res:
        counts["ready"] = float(json.loads(res.read())["ready"])
    return counts


def agreement(first: dict[str, float], last: dict[str, float], results: list[dict]) -> dict:
    """The server's counters over the soak (last - first) beside the soak's own counts."""
    api = [r for r in results if r["via"] == "openai"]
    ours = {"api_requests": len(api), "api_429": sum(r["rate_limited"] for r in api),
            "generations": sum(not r["error"] and not r["rate_limited"] for r in results)}
    server = {k: last[k] - first[k] for k in ours}
    api_tokens = sum(r["tokens"] for r in api)
    return {"soak": ours, "server": server, "agree": ours == server,
            "server_tokens": last["tokens"] - first["tokens"], "api_tokens_counted_by_clients": api_tokens}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--model", default=None, help="model for the started server (default: built-in)")
    p.add_argument("--quantize", default="8bit", help="quantization for the started server (default: 8bit)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="conversations the server decodes as one batch (default: 8)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--minutes", type=float, default=5.0, help="how long to run (default: 5)")
    p.add_argument("--out", default="runs/soak", help="report folder (default: runs/soak)")
    p.add_argument("--auth", action="store_true",
                   help="start the server with one API key per client and a chat-page login, and use them")
    p.add_argument("--rate-limit-rpm", type=int, default=0, help="per-key requests per minute on the server")
    p.add_argument("--rate-limit-concurrent", type=int, default=0, help="per-key generations at once on the server")
    p.add_argument("--throughput", action="store_true",
                   help="instead of the mixed soak: OpenAI-API clients asking for a detailed description, one "
                        "client for --minutes and then --clients clients for --minutes; prints each phase's "
                        "aggregate tokens/s, p50/p95 latency and the ratio")
    args = p.parse_args(argv)
    args.prompt = "Describe the picture in detail." if args.throughput else None
    args.max_tokens = 64 if args.throughput else 8
    import secrets

    args.keys = [f"sk-soak-{i}-{secrets.token_hex(8)}" for i in range(args.clients)]
    args.login = ["soak", secrets.token_hex(8)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    from llava_lite.data.easyvqa import eval_items

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, url = (None, args.url.rstrip("/")) if args.url else _start_server(args, out / "server.log")
    items = eval_items("test", limit=500, seed=1)
    if args.throughput:
        try:
            return _throughput(url, items, args, out)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    memory: list[tuple[float, float]] = []
    results: list[dict] = []
    lock = threading.Lock()
    start = time.time()
    stop = start + 60 * args.minutes
    first = scrape(url)
    threads = _start_clients(args.clients, url, items, stop, results, lock, args)
    try:
        not_ready = _watch(proc, url, start, stop, results, memory)
        for th in threads:
            th.join(timeout=600)
        last = scrape(url)
        if proc is not None:
            memory.append((time.time() - start, _rss_mb(proc.pid)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    report = summarize(results, memory, args.clients, args.minutes)
    report["metrics_vs_soak"] = agreement(first, last, results)
    report["health_not_ready_scrapes"] = not_ready
    (out / "soak.json").write_text(json.dumps({**report, "memory": memory}, indent=2))
    md = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in report.items())
    (out / "soak.md").write_text(md)
    _plot(results, memory, out / "soak.png", start)
    print(md)
    return 0 if report["errors"] == 0 and report["metrics_vs_soak"]["agree"] else 1


def _start_clients(n: int, url: str, items: list[dict], stop: float, results: list, lock: threading.Lock,
                   args) -> list[threading.Thread]:
    threads = [threading.Thread(target=_client, args=(i, url, items, stop, results, lock, args), daemon=True)
               for i in range(n)]
    for th in threads:
        th.start()
    return threads


def _phase(url: str, items: list[dict], clients: int, args) -> dict:
    """`clients` clients for --minutes: aggregate completion tokens/s and latency."""
    results: list[dict] = []
    lock = threading.Lock()
    before = scrape(url)
    start = time.time()
    stop = start + 60 * args.minutes
    for th in _start_clients(clients, url, items, stop, results, lock, args):
        th.join(timeout=600)
    elapsed = time.time() - start
    after = scrape(url)
    server = {k: after[k] - before[k] for k in PREFILL_COUNTERS.values()}
    ok = [r for r in results if not r["error"] and not r["rate_limited"]]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.array([float("nan")])
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": sorted({r["error"] for r in results if r["error"]})[:3],
            "tokens": sum(r["tokens"] for r in ok), "seconds": round(elapsed, 1),
            "tok_per_s": round(sum(r["tokens"] for r in ok) / elapsed, 2),
            "p50_s": round(float(np.percentile(lat, 50)), 2), "p95_s": round(float(np.percentile(lat, 95)), 2),
            # the server's own view: requests per prefill pass, and prompt tokens the cache saved
            "per_prefill": round(server["prefill_requests"] / max(server["prefill_passes"], 1), 2),
            "reused": round(server["reused_tokens"] / max(server["reused_tokens"] + server["prefill_tokens"], 1), 2)}


def _throughput(url: str, items: list[dict], args, out: Path) -> int:
    """One client, then --clients clients, side by side in one run against one server."""
    phases = [_phase(url, items, 1, args), _phase(url, items, args.clients, args)]
    ratio = phases[1]["tok_per_s"] / phases[0]["tok_per_s"] if phases[0]["tok_per_s"] else float("nan")
    report = {"phases": phases, "ratio": round(ratio, 2), "prompt": args.prompt, "max_tokens": args.max_tokens}
    (out / "throughput.json").write_text(json.dumps(report, indent=2))
    keys = ["clients", "requests", "errors", "tokens", "seconds", "tok_per_s", "p50_s", "p95_s", "per_prefill",
            "reused"]
    md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    md += "".join("| " + " | ".join(str(ph[k]) for k in keys) + " |\n" for ph in phases)
    md += f"\n{args.clients} clients / 1 client, aggregate tokens/s: **{ratio:.2f}x**\n"
    (out / "throughput.md").write_text(md)
    print(md)
    return 0 if all(ph["errors"] == 0 for ph in phases) else 1


def _watch(proc, url: str, start: float, stop: float, results: list, memory: list) -> int:
    """Until `stop`: server memory and /health + /metrics every 5 s; returns not-ready scrapes."""
    from tqdm import tqdm

    not_ready = 0
    with tqdm(total=int(stop - start), desc="soak", unit="s") as bar:
        while time.time() < stop:
            if proc is not None:
                memory.append((time.time() - start, _rss_mb(proc.pid)))
            not_ready += scrape(url)["ready"] < 1
            time.sleep(5)
            bar.n = min(int(time.time() - start), bar.total)
            bar.set_postfix(requests=len(results), errors=sum(bool(r["error"]) for r in results))
    return not_ready


def summarize(results: list[dict], memory: list[tuple[float, float]], clients: int, minutes: float) -> dict:
    """Requests, errors, latency percentiles and the memory trend of a soak run."""
    lat = np.array([r["latency_s"] for r in results if not r["error"]]) if results else np.array([])
    mem = np.array(memory)
    tail = mem[len(mem) // 2:]  # the second half: caches and allocator pools fill up first
    slope = float(np.polyfit(tail[:, 0] / 60, tail[:, 1], 1)[0]) if len(mem) > 8 else float("nan")
    report = {
        "clients": clients, "minutes": minutes, "requests": len(results),
        "errors": sum(bool(r["error"]) for r in results),
        "rate_limited": sum(r.get("rate_limited", False) for r in results),
        "error_examples": sorted({r["error"] for r in results if r["error"]})[:5],
        "p50_s": float(np.percentile(lat, 50)) if lat.size else None,
        "p95_s": float(np.percentile(lat, 95)) if lat.size else None,
        "requests_per_min": len(results) / minutes,
        # single-turn API requests only: later gradio turns carry earlier images in their history
        "accuracy_api": float(np.mean([r["correct"] for r in results if not r["error"] and r["via"] == "openai"]))
        if any(r["via"] == "openai" and not r["error"] for r in results) else None,
        "rss_start_mb": float(mem[0, 1]) if len(mem) else None,
        "rss_end_mb": float(mem[-1, 1]) if len(mem) else None,
        "rss_trend_mb_per_min_second_half": slope,
    }
    return report


def _plot(results: list[dict], memory: list, path: Path, start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ok = [r for r in results if not r["error"]]
    axes[0].scatter([r["t"] - start for r in ok], [r["latency_s"] for r in ok], s=4)
    axes[0].set_xlabel("seconds")
    axes[0].set_ylabel("latency (s)")
    axes[0].set_title(f"{len(results)} requests, {len(results) - len(ok)} errors")
    if memory:
        axes[1].plot([m[0] for m in memory], [m[1] for m in memory])
    axes[1].set_xlabel("seconds")
    axes[1].set_ylabel("server RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
