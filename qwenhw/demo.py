"""`qwenhw demo`: the whole pipeline on a tiny real-architecture Qwen3-MoE, then what this machine could run."""

from __future__ import annotations

import time

from . import api

SHOWCASE = ("Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-30B-A3B-FP8", "Qwen3-Coder-30B-A3B-Instruct",
            "Qwen3-Next-80B-A3B-Instruct", "Qwen3-235B-A22B", "Qwen3-Coder-480B-A35B-Instruct")


def run_demo(path: str | None = None, skip_chat: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from . import tiny

    console = Console(highlight=False)
    t0 = time.perf_counter()
    console.rule("1. detect")
    hw = api.detect()
    console.print(hw.summary())
    console.rule("2. a tiny Qwen3-MoE checkpoint (real architecture, real Qwen3 tokenizer, random weights)")
    ckpt = tiny.build(path)
    console.print(f"checkpoint: {ckpt}")
    console.rule("3. plan")
    plan = api.plan(str(ckpt), hw, context=2048)
    console.print(plan.explain(), markup=False)
    if not skip_chat:
        console.rule("4. load and chat")
        with api.load(plan) as engine:
            question = [{"role": "user", "content": "What is 2+2?"}]
            for thinking in (False, True):
                r = engine.chat(question, thinking=thinking, max_tokens=24, temperature=0)
                console.print(f"[bold]thinking={thinking}[/bold]: prompt ends {r.prompt[-40:]!r}")
                console.print(f"  reasoning: {r.reasoning[:80]!r}", style="dim")
                console.print(f"  answer:    {r.content[:80]!r}  ({r.completion_tokens} tokens, random weights: "
                              f"gibberish is expected)")
    console.rule("5. what this machine could run")
    table = Table("model", "fits", "backend", "engine", "layout", "tok/s", "note")
    for name in SHOWCASE:
        p = api.plan(name, hw)
        note = (p.reasons[0] if p.reasons else "")[:70]
        table.add_row(name, "yes" if p.fits else "no", p.backend, p.engine, str(p.parallel),
                      f"{p.estimate.decode_tok_s:.1f}" if p.fits else "-", note)
    console.print(table)
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.1f} s[/dim]")
