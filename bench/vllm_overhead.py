"""qwenhw's overhead over calling vLLM directly: load time and decode tokens/s, same process, side by side.

Run inside the vllm environment (vLLM importable, so qwenhw loads in-process like the direct call):
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 .venvs/vllm/bin/python bench/vllm_overhead.py [--rounds 2]
Both sides load the same tiny Qwen3-MoE checkpoint (qwenhw.tiny) with the same engine arguments (the plan's),
alternating direct / qwenhw for `rounds` loads each; decode speed is greedy batch-1 generation of
--tokens tokens, `--repeats` times per load. Medians are printed. Goal: overhead <= 3%.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

PROMPT = "Give me a short introduction to large language models."


def direct(path: str, engine_args: dict, tokens: int, repeats: int) -> tuple[float, list[float], list[float]]:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**{**engine_args, "model": path})
    load = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up (first-call allocations)
    rates, steps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t0
        rates.append(len(out.token_ids) / dt)
        steps.append(dt / len(out.token_ids))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return load, rates, steps


def through_qwenhw(path: str, tokens: int, repeats: int, context: int) -> tuple[float, float, list[float], list[float]]:
    import qwenhw

    t0 = time.perf_counter()
    plan = qwenhw.plan(path, backend="vllm", context=context)
    t_plan = time.perf_counter() - t0
    engine = qwenhw.load(plan)
    load = time.perf_counter() - t0
    engine.generate(PROMPT, max_tokens=tokens, temperature=0)  # warm-up
    rates, stream_rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(PROMPT, max_tokens=tokens, temperature=0)[0]
        rates.append(max(out.completion_tokens, 1) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pieces = list(engine.stream(PROMPT, max_tokens=tokens, temperature=0))
        stream_rates.append(max(len(pieces), 1) / (time.perf_counter() - t0))
    engine.close()
    gc.collect()
    return t_plan, load, rates, stream_rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="loads per side (alternating)")
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per load")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()

    import qwenhw
    import qwenhw.tiny
    from qwenhw_vllm.engine import engine_kwargs

    path = str(qwenhw.tiny.build())
    plan = qwenhw.plan(path, backend="vllm", context=args.context)
    engine_args, _, _ = engine_kwargs(plan, path)
    for key, value in plan.config["env"].items():
        os.environ.setdefault(key, value)
    print(f"engine args (both sides): {engine_args}")

    d_load, d_rate, d_step, q_plan, q_load, q_rate, q_stream = [], [], [], [], [], [], []
    for _ in range(args.rounds):
        load, rates, steps = direct(path, engine_args, args.tokens, args.repeats)
        d_load.append(load), d_rate.extend(rates), d_step.extend(steps)
        t_plan, load, rates, stream = through_qwenhw(path, args.tokens, args.repeats, args.context)
        q_plan.append(t_plan), q_load.append(load), q_rate.extend(rates), q_stream.extend(stream)

    med = statistics.median
    rows = [
        ("load (s)", med(d_load), med(q_load), (med(q_load) / med(d_load) - 1) * 100),
        ("decode tok/s, generate", med(d_rate), med(q_rate), (med(d_rate) / med(q_rate) - 1) * 100),
        ("decode tok/s, stream", med(d_rate), med(q_stream), (med(d_rate) / med(q_stream) - 1) * 100),
    ]
    print(f"\n{'metric':<26}{'vLLM direct':>14}{'via qwenhw':>14}{'overhead':>11}")
    for name, a, b, over in rows:
        print(f"{name:<26}{a:>14.2f}{b:>14.2f}{over:>10.1f}%")
    print(f"(qwenhw load includes detect + plan: median {med(q_plan):.2f} s; {args.rounds} loads per side, "
          f"{args.repeats} x {args.tokens} greedy tokens per load; per-step time direct {med(d_step) * 1000:.1f} ms)")


if __name__ == "__main__":  # vLLM starts worker processes with spawn: keep the guard
    main()
