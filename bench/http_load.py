"""A load client with the standard library only, for machines without vLLM's (bench/serving.py uses vLLM's):
N streaming /v1/completions requests to a running server, all at once or arriving at a rate (Poisson, as
`vllm bench serve --request-rate`), each a prompt of about P tokens and an answer of exactly M (ignore_eos);
time to first token and time per output token per request (medians and p99), output tokens/s from the
first request to the last answer, and the server's /metrics afterwards.

    python bench/http_load.py http://127.0.0.1:8000 --requests 32 --prompt-words 700 --max-tokens 128
    python bench/http_load.py http://127.0.0.1:8000 --requests 64 --rate 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from urllib.request import Request, urlopen


def one(base: str, model: str, prompt: str, max_tokens: int, out: list, i: int) -> None:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    first, tokens = None, 0
    with urlopen(Request(base + "/v1/completions", body, {"Content-Type": "application/json"}), timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    out[i] = {"ttft_s": first, "tokens": tokens, "latency_s": end - start, "end": end,
              "tpot_s": (end - start - first) / (tokens - 1) if first is not None and tokens > 1 else None}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default="m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=700,
                    help="random words per prompt (one token each with Qwen's tokenizer)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rate", type=float, default=0.0, help="requests per second (Poisson arrivals); 0: all at once")
    args = ap.parse_args()
    rng = random.Random(0)
    words = ["alpha", "river", "stone", "quantum", "garden", "seven", "marble", "orbit", "lantern", "violet"]
    prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_words)) for _ in range(args.requests)]
    out: list = [None] * args.requests
    threads = [threading.Thread(target=one, args=(args.base, args.model, p, args.max_tokens, out, i))
               for i, p in enumerate(prompts)]
    start = time.perf_counter()
    for t in threads:
        t.start()
        if args.rate > 0:
            time.sleep(rng.expovariate(args.rate))
    for t in threads:
        t.join()
    done = [o for o in out if o]
    wall = max((o["end"] for o in done), default=start) - start
    ttfts = [o["ttft_s"] for o in done if o["ttft_s"] is not None]
    tpots = [o["tpot_s"] for o in done if o["tpot_s"] is not None]
    result = {"requests": args.requests, "rate": args.rate or "inf", "completed": len(done), "wall_s": wall,
              "output_tok_s": sum(o["tokens"] for o in done) / wall if wall else None,
              "median_ttft_ms": 1e3 * statistics.median(ttfts) if ttfts else None,
              "p99_ttft_ms": 1e3 * percentile(ttfts, 99) if ttfts else None,
              "median_tpot_ms": 1e3 * statistics.median(tpots) if tpots else None,
              "p99_tpot_ms": 1e3 * percentile(tpots, 99) if tpots else None,
              "tokens_each": sorted({o["tokens"] for o in done})}
    with urlopen(args.base + "/metrics", timeout=30) as r:
        result["metrics"] = [line for line in r.read().decode().splitlines()
                             if line.startswith(("qwenhw:batch_size_count", "qwenhw:batch_size_sum",
                                                 "qwenhw:requests_total", "qwenhw:generation_tokens_total"))]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
