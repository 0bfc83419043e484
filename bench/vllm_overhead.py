"""qwenhw's overhead over calling vLLM directly: load time and decode tokens/s, same process, side by side.

Run inside the vllm environment (vLLM importable, so qwenhw loads in-process like the direct call):
    VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1 .venvs/vllm/bin/python bench/vllm_overhead.py [--rounds 2]
Both sides load the same tiny Qwen3-MoE checkpoint (qwenhw.tiny) with the same engine arguments (the plan's),
alternating direct / qwenhw for `rounds` loads each; then both engines stay up and greedy batch-1 generation
of --tokens tokens alternates between them `--repeats` times (same machine load for both). Medians are
printed; overhead > 0 means qwenhw is slower. Goal: overhead <= 3%.
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


def load_direct(path: str, engine_args: dict):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**{**engine_args, "model": path})
    return llm, time.perf_counter() - t0


def load_qwenhw(path: str, context: int):
    import qwenhw

    t0 = time.perf_counter()
    plan = qwenhw.plan(path, backend="vllm", context=context)
    t_plan = time.perf_counter() - t0
    engine = qwenhw.load(plan)
    return engine, time.perf_counter() - t0, t_plan


def close_direct(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="loads per side (alternating)")
    ap.add_argument("--repeats", type=int, default=10, help="timed generations per side (alternating)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()

    import qwenhw
    import qwenhw.tiny
    from vllm import SamplingParams

    from qwenhw_vllm.engine import engine_kwargs

    path = str(qwenhw.tiny.build())
    plan = qwenhw.plan(path, backend="vllm", context=args.context)
    engine_args, _, _ = engine_kwargs(plan, path)
    for key, value in plan.config["env"].items():
        os.environ.setdefault(key, value)
    print(f"engine args (both sides): {engine_args}")

    # load time: alternate, one engine alive at a time; the last pair stays up for the decode comparison
    d_load, q_load, q_plan = [], [], []
    llm = engine = None
    for r in range(args.rounds):
        llm, t = load_direct(path, engine_args)
        d_load.append(t)
        if r < args.rounds - 1:
            close_direct(llm)
        engine, t, t_plan = load_qwenhw(path, args.context)
        q_load.append(t), q_plan.append(t_plan)
        if r < args.rounds - 1:
            engine.close()
            gc.collect()

    # decode: both engines alive, calls interleaved, so both see the same machine load
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    engine.generate(PROMPT, max_tokens=args.tokens, temperature=0)
    d_rate, q_rate, q_stream, d_step = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t0
        d_rate.append(len(out.token_ids) / dt), d_step.append(dt / len(out.token_ids))
        t0 = time.perf_counter()
        q = engine.generate(PROMPT, max_tokens=args.tokens, temperature=0)[0]
        q_rate.append(len(q.token_ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pieces = list(engine.stream(PROMPT, max_tokens=args.tokens, temperature=0))
        q_stream.append(len(pieces) / (time.perf_counter() - t0))
    assert len(out.token_ids) == len(q.token_ids), "both sides must generate the same tokens"
    engine.close()
    close_direct(llm)

    med = statistics.median
    rows = [
        ("load (s)", med(d_load), med(q_load), (med(q_load) / med(d_load) - 1) * 100),
        ("decode tok/s, generate", med(d_rate), med(q_rate), (med(d_rate) / med(q_rate) - 1) * 100),
        ("decode tok/s, stream", med(d_rate), med(q_stream), (med(d_rate) / med(q_stream) - 1) * 100),
    ]
    print(f"\n{'metric':<26}{'vLLM direct':>14}{'via qwenhw':>14}{'overhead':>11}")
    for name, a, b, over in rows:
        print(f"{name:<26}{a:>14.2f}{b:>14.2f}{over:>10.1f}%")
    print(f"(qwenhw load includes detect + plan: median {med(q_plan):.2f} s; {args.rounds} loads per side; "
          f"{args.repeats} x {args.tokens} greedy tokens per side, interleaved; per-step time direct "
          f"{med(d_step) * 1000:.1f} ms; loads: direct {[round(x, 1) for x in d_load]}, qwenhw "
          f"{[round(x, 1) for x in q_load]})")


if __name__ == "__main__":  # vLLM starts worker processes with spawn: keep the guard
    main()
