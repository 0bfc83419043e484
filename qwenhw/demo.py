"""`qwenhw demo`: the whole pipeline on a tiny real-architecture Qwen3-MoE, then what this machine could run."""

from __future__ import annotations

import time

from . import api

SHOWCASE = ("Qwen3-0.6B", "Qwen3-8B", "Qwen3-32B", "Qwen3-30B-A3B", "Qwen3-30B-A3B-FP8", "Qwen3-Coder-30B-A3B-Instruct",
            "Qwen3-Next-80B-A3B-Instruct", "Qwen3-235B-A22B", "Qwen3-Coder-480B-A35B-Instruct")


def run_demo(path: str | None = None, skip_chat: bool = False) -> None:
    from rich.console import Console

    from . import tiny

    console = Console(highlight=False)
    t0 = time.perf_counter()
    console.rule("1. detect")
    hw = api.detect()
    console.print(hw.summary())
    console.rule("2. a tiny Qwen3-MoE: real architecture and tokenizer, random weights")
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
    console.print(showcase_table(hw))
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.1f} s[/dim]")


def showcase_table(hw):
    """The planner's verdict for real Qwen models on `hw`, narrow enough for an 80-column terminal."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("model", no_wrap=True)
    table.add_column("fits")
    table.add_column("backend/engine", overflow="fold")
    table.add_column("tok/s", justify="right")
    table.add_column("GiB used", max_width=16)
    why_not = []
    for name in SHOWCASE:
        p = api.plan(name, hw)
        table.add_row(name, "yes" if p.fits else "[red]no[/red]", f"{p.backend}\n[dim]{p.engine}[/dim]",
                      _rate(p.estimate.decode_tok_s) if p.fits else "-", _where(p))
        if not p.fits and p.reasons:
            why_not.append(Text(f"{name}: {p.reasons[0]}", style="dim"))
    return Group(table, *why_not)


def _rate(tok_s: float) -> str:
    return f"{tok_s:.0f}" if tok_s >= 100 else f"{tok_s:.1f}" if tok_s >= 1 else f"{tok_s:.2g}"


def _where(plan) -> str:
    """Memory the plan uses, summed per place: GPU (all cards), RAM, disk."""
    sums = {"GPU": 0.0, "RAM": 0.0, "disk": 0.0}
    for d in plan.devices:
        sums["RAM" if d.kind == "cpu" else "disk" if d.kind == "disk" else "GPU"] += d.total_gib
    return " ".join(f"{k} {v:.0f}" if v >= 10 else f"{k} {v:.1f}" for k, v in sums.items() if v > 0.05) or "-"
