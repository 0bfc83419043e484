"""The `qwenhw` command: a thin layer over the Python API. Errors print one paragraph, never a traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import api, plugins, settings
from .errors import BadInput, DoesNotFit, QwenhwError
from .planning.workload import DUMMY_WARNING


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def friendly(fn: Callable) -> Callable:
    """Turn QwenhwError (and Ctrl-C) into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QwenhwError as exc:
            click.echo(f"qwenhw: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("qwenhw: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader left (`qwenhw plan ... | head`): stop quietly, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as exc:  # a bug, not bad input: still one paragraph (QWENHW_DEBUG=1 shows the traceback)
            if settings.get("QWENHW_DEBUG"):
                raise
            click.echo(f"qwenhw: internal error: {type(exc).__name__}: {exc}. This is a bug in qwenhw, not in what "
                       f"you asked for; run again with QWENHW_DEBUG=1 for the traceback and report it.", err=True)
            sys.exit(1)

    return wrapper


class Number(click.ParamType):
    """A finite number (NaN and infinities refused) of at least `low`."""

    name = "number"

    def __init__(self, low: float = 0.0):
        self.low = low

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < self.low:
            self.fail(f"{value!r} must be a finite number of at least {self.low:g}", param, ctx)
        return number


class OneParagraph(click.Group):
    """Usage errors (an option's value out of range, a missing argument) as one paragraph and exit 2, like
    every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            command = exc.ctx.command.name if exc.ctx is not None and exc.ctx.command is not self else None
            where = f"`qwenhw {command} --help`" if command else "`qwenhw --help`"
            click.echo(f"qwenhw: {exc.format_message().rstrip('.')}. {where} lists the options.", err=True)
            sys.exit(2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("qwenhw: interrupted", err=True)
            sys.exit(130)


@click.group(cls=OneParagraph, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwenhw")
def main() -> None:
    """Run Qwen models well on the hardware you have: detect, plan, pick a backend, run."""


# --- detect ------------------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the hardware profile as JSON.")
@click.option("--list", "list_bundled", is_flag=True, help="List the bundled profiles usable with --hardware.")
@click.option("--hardware", help="Show a bundled profile or a profile file instead of this machine.")
@click.option("--cluster", is_flag=True, help="The whole Ray cluster: each node probed on that node (Ray tasks).")
@click.option("--ray-address", envvar="RAY_ADDRESS", help="The Ray cluster for --cluster (HOST:PORT; env RAY_ADDRESS).")
@friendly
def detect(as_json: bool, list_bundled: bool, hardware: str | None, cluster: bool, ray_address: str | None) -> None:
    """Detect this machine's GPUs, CPU, RAM and disk (or, with --cluster, every node of a Ray cluster)."""
    if cluster:
        hardware = "cluster"
    from .hardware import bundled_names

    if list_bundled:
        from .hardware import load_bundled

        names = bundled_names()
        if as_json:
            click.echo(json.dumps(names))
        else:
            width = max(len(n) for n in names)
            for name in names:
                click.echo(f"{name:<{width}}  {load_bundled(name).summary()}")
            click.echo(f"(use one with --hardware NAME, e.g. `qwenhw plan Qwen3-30B-A3B --hardware {names[1]}`)")
        return
    profile = api.hardware_profile(hardware, ray_address)
    if as_json:
        click.echo(profile.to_json())
        return
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{profile.name}[/bold]: {profile.summary()}")
    for node in profile.nodes:
        if len(profile.nodes) > 1:
            console.print(f"[bold]{node.hostname}[/bold]" + (f" at {node.address}" if node.address else "")
                          + (f", {node.network_gbs:g} GB/s to the head" if node.network_gbs else ""))
        table = Table("device", "name", "memory GiB", "bandwidth GB/s", "bf16 TFLOP/s", "notes")
        for a in node.accelerators:
            notes = f"cc {a.compute_capability}" if a.compute_capability else ""
            table.add_row(a.device_id, a.name, f"{a.memory_bytes / 2**30:.1f}", f"{a.bandwidth_gbs:.0f}",
                          f"{a.bf16_tflops:.0f}", notes)
        c = node.cpu
        table.add_row("cpu", c.model, f"{c.ram_bytes / 2**30:.1f}", f"{c.memory_bandwidth_gbs:.0f}",
                      f"{c.bf16_tflops:.1f}", f"{c.sockets} socket(s), {c.physical_cores} cores, "
                      f"{' '.join(f for f in c.flags if f.startswith(('avx512', 'amx', 'avx2')))}")
        table.add_row("disk", node.disk.path, f"{node.disk.free_bytes / 2**30:.0f} free", "", "", "")
        console.print(table)
        for link in node.links[:8]:
            console.print(f"  link {link.a}<->{link.b}: {link.kind} {link.bandwidth_gbs:.0f} GB/s")
    for probe in profile.probes:
        console.print(f"  probe {probe.name}: {'ok' if probe.ok else 'nothing'} - {probe.detail}", style="dim")


# --- backends ----------------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--hardware", help="Judge availability for a bundled profile or profile file instead of this machine.")
@friendly
def backends(as_json: bool, hardware: str | None) -> None:
    """Every registered backend, available or not, and why."""
    reg = plugins.load()
    profile = api.hardware_profile(hardware)
    rows = []
    for name, backend in sorted(reg.backends.items()):
        try:
            a = backend.probe(profile)
            rows.append({"name": name, "available": a.ok, "reason": a.reason, "install": a.install,
                         "versions": a.versions, "distribution": reg.owners[name],
                         "version": reg.versions.get(reg.owners[name]), "vendors": list(backend.vendors),
                         "description": backend.description})
        except Exception as exc:
            rows.append({"name": name, "available": False, "reason": f"probe raised {type(exc).__name__}: {exc}",
                         "distribution": reg.owners[name]})
    faults = [{"plugin": f.plugin, "stage": f.stage, "error": f.error} for f in reg.faults]
    if as_json:
        click.echo(json.dumps({"hardware": profile.name, "backends": rows, "faults": faults}, indent=2))
        return
    from rich.table import Table

    table = Table("backend", "available", "why", "from")
    for r in rows:
        table.add_row(r["name"], "yes" if r["available"] else "no", r["reason"],
                      f"{r['distribution']} {r.get('version') or ''}")
    console = _console()
    console.print(table)
    for r in rows:  # whole, on lines of their own: a command is copied, not read
        if r.get("install") and not r["available"]:
            console.print(f"install {r['name']}: {r['install']}", soft_wrap=True)
    for f in faults:
        console.print(f"[red]plugin {f['plugin']} failed in {f['stage']}:[/red] {f['error']}")


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True)
@friendly
def plugins_cmd(as_json: bool) -> None:
    """Installed plugins, their hooks and versions."""
    reg = plugins.load()
    rows = []
    for name, plugin in reg.pm.list_name_plugin():
        hooks = sorted(h.name for h in reg.pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "version": reg.versions.get(name), "hooks": hooks})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(f"{r['name']} {r['version']}: {', '.join(r['hooks'])}")


@main.command("settings")
@click.option("--json", "as_json", is_flag=True)
@friendly
def settings_cmd(as_json: bool) -> None:
    """The QWENHW_* environment variables: what each does, its default and its value here."""
    rows = settings.describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        now = f" (set: {r['value']!r})" if r["value"] is not None else ""
        click.echo(f"{r['name']} = {r['default']!r}{now}\n    {r['doc']}")


# --- plan --------------------------------------------------------------------------------------------
def request_options(fn: Callable) -> Callable:
    options = [
        click.option("--hardware", help="Bundled profile name (see `qwenhw detect --list`) or a profile JSON file."),
        click.option("--context", type=click.IntRange(min=16), help="Tokens per sequence (prompt + output)."),
        click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Sequences served together."),
        click.option("--dtype", help="Weight dtype: auto, bf16, fp16, fp32, fp8, int8, int4."),
        click.option("--kv-dtype", help="KV-cache dtype: auto, bf16, fp8."),
        click.option("--backend", help="Force a backend (see `qwenhw backends`)."),
        click.option("--engine", help="Force an engine of the backend (e.g. deepspeed-zero3)."),
        click.option("--gpu-memory-gib", type=Number(), help="Per-GPU memory budget in GiB."),
        click.option("--cpu-memory-gib", type=Number(), help="Host RAM budget in GiB."),
        click.option("--prompt-tokens", type=click.IntRange(min=1),
                     help="Tokens per prompt the plan is ranked for [default: 1024]."),
        click.option("--output-tokens", type=click.IntRange(min=1),
                     help="Tokens per answer the plan is ranked for [default: 256]."),
        click.option("--ray-address", envvar="RAY_ADDRESS",
                     help="The Ray cluster of a multi-node plan (HOST:PORT; env RAY_ADDRESS); --hardware cluster "
                          "plans for what it holds."),
        click.option("--load-format", type=click.Choice(["auto", "dummy"]),
                     help="dummy: random weights from the checkpoint's config.json (benchmarks; answers are noise)."),
        click.option("--prefix-caching/--no-prefix-caching", default=True, show_default=True,
                     help="Reuse the KV cache of prompts that start alike (vLLM's automatic prefix caching)."),
        click.option("--goal", type=click.Choice(["latency", "throughput"]),
                     help="Rank by request latency or by output tokens/s [default: latency at concurrency 1, "
                          "else throughput]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _request(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("context", "concurrency", "dtype", "kv_dtype", "backend", "engine", "gpu_memory_gib", "cpu_memory_gib",
            "prompt_tokens", "output_tokens", "goal", "load_format", "ray_address", "prefix_caching")
    return {k: kw[k] for k in keys if k in kw}


@main.command()
@click.argument("model")
@request_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--emit", type=click.Path(file_okay=False), help="Write the plan's launch files into this folder.")
@friendly
def plan(model: str, hardware: str | None, as_json: bool, emit: str | None, **kw: Any) -> None:
    """Plan how to run MODEL (catalog name, hub id or checkpoint dir); exit 3 if nothing fits."""
    result = api.plan(model, hardware, **_request(kw))
    if emit:
        out = Path(emit)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, text in result.artifacts.items():
                (out / name).write_text(text)
            (out / "plan.json").write_text(result.to_json())
        except OSError as exc:
            raise BadInput(f"Cannot write the launch files into {emit}: {exc.strerror or exc}. Give --emit a "
                           f"folder you can write to (it is created if missing).") from None
    if as_json:
        click.echo(result.to_json())
    else:
        print_plan(result)
        if emit:
            click.echo(f"wrote {', '.join(sorted(result.artifacts) + ['plan.json'])} to {emit}")
    if not result.fits:
        sys.exit(DoesNotFit.exit_code)


def print_plan(result: Any) -> None:
    from rich.table import Table

    console = _console()
    verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
    console.print(f"[bold]{result.model}[/bold] on {result.hardware}: [bold]{result.backend}[/bold] "
                  f"({result.engine}), {result.parallel}, {verdict}")
    if result.devices:
        table = Table("device", "kind", "weights", "KV cache", "overhead", "total", "capacity", title="memory (GiB)")
        for d in result.devices:
            table.add_row(d.id, d.kind, f"{d.weights_gib:.2f}", f"{d.kv_cache_gib:.2f}", f"{d.overhead_gib:.2f}",
                          f"{d.total_gib:.2f}", f"{d.capacity_gib:.2f}")
        console.print(table)
    if result.fits:
        first, *basis = result.estimate_lines()
        console.print(f"{first}; context {result.context} (max {result.max_context})")
        for line in basis:
            console.print(f"[dim]  {line}[/dim]")
    for r in result.reasons:
        console.print(f"  - {r}")
    for w in result.warnings:
        console.print(f"  [yellow]! {w}[/yellow]")
    if result.rejected:
        console.print("[dim]not chosen:[/dim]")
        for r in result.rejected:
            console.print(f"  [dim]{r.backend}: {r.why}[/dim]")
    for name, text in result.artifacts.items():
        if "\n" not in text.strip():
            console.print(f"[bold]{name}[/bold]: {text.strip()}")
    if result.artifacts:
        console.print(f"[dim]launch files: {', '.join(result.artifacts)} (write them with --emit DIR)[/dim]")


# --- run ---------------------------------------------------------------------------------------------
def _load(model: Any, kw: dict[str, Any]):  # a name, a folder or a Plan
    engine = api.load(model, **_request(kw))
    p = engine.plan
    click.echo(f"qwenhw: {p.model} with {p.backend} ({p.engine}), {p.parallel}", err=True)
    if p.config.get("load_format") == "dummy":
        click.echo(f"qwenhw: WARNING: {DUMMY_WARNING}", err=True)
    return engine


@main.command()
@click.argument("model")
@click.option("--prompt", required=True, help="The user message.")
@click.option("--think/--no-think", default=None, help="Qwen3 thinking mode (default: the model's own).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=Number(), help="0 for greedy; default per mode as Qwen recommends.")
@click.option("--raw", is_flag=True, help="Complete the prompt as raw text (no chat template).")
@request_options
@friendly
def run(model: str, prompt: str, think: bool | None, max_tokens: int, temperature: float | None, raw: bool,
        hardware: str | None, **kw: Any) -> None:
    """Load MODEL and answer one prompt."""
    _check_local(hardware, max_tokens, "run")
    with _load(model, kw) as engine:
        if raw:
            for delta in engine.stream(prompt, max_tokens=max_tokens,
                                       temperature=1.0 if temperature is None else temperature):
                click.echo(delta, nl=False)
            click.echo()
            return
        from .chat_repl import print_stream

        # soft_wrap: streamed pieces are wrapped by the terminal, not cut by rich one piece at a time
        console = _console()
        console.soft_wrap = True
        messages = [{"role": "user", "content": prompt}]
        print_stream(console, engine.chat_stream(messages, thinking=think, max_tokens=max_tokens,
                                                 temperature=temperature))
        console.print()


def _check_local(hardware: str | None, max_tokens: int | None, command: str) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise BadInput(f"--max-tokens {max_tokens} must be at least 1.")
    if hardware:
        raise BadInput(f"`qwenhw {command}` loads on this machine; --hardware is for `qwenhw plan`. Drop --hardware.")


@main.command()
@click.argument("model")
@click.option("--think/--no-think", default=None, help="Start with Qwen3 thinking on or off (default: the model's own).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Longest reply (/set max_tokens N).")
@click.option("--temperature", type=Number(), help="0 for greedy; default per mode as Qwen recommends.")
@click.option("--system", help="A system prompt for the conversation.")
@request_options
@friendly
def chat(model: str, think: bool | None, max_tokens: int, temperature: float | None, system: str | None,
         hardware: str | None, **kw: Any) -> None:
    """Talk to MODEL interactively: streamed replies, /think and /no_think, /reset, Ctrl-C stops a reply."""
    from .chat_repl import ChatSession, run_chat

    _check_local(hardware, max_tokens, "chat")
    with _load(model, kw) as engine:
        console = _console()
        console.soft_wrap = True
        run_chat(engine, ChatSession(engine, think, max_tokens, temperature, system), console)


@main.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--api-key", default=lambda: settings.get("QWENHW_API_KEY"),
              help="Require `Authorization: Bearer KEY` (default: QWENHW_API_KEY).")
@click.option("--served-model-name", help="The model name clients send (default: MODEL as given).")
@click.option("--max-queue", type=click.IntRange(min=1),
              help="Requests waiting or decoding at most, more are answered 503 (qwenhw's server; default 1024).")
@click.option("--qwenhw-server", is_flag=True,
              help="Serve with qwenhw's own server even where the plan's engine has one (vLLM's).")
@request_options
@friendly
def serve(model: str, host: str, port: int, api_key: str | None, served_model_name: str | None,
          max_queue: int | None, qwenhw_server: bool, hardware: str | None, **kw: Any) -> None:
    """An OpenAI-compatible server for MODEL: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics. A plan whose engine has a server of its own (vLLM) is served by that server."""
    import logging

    from .serve import make_server

    _check_local(hardware, None, "serve")
    chosen = api.plan(model, **_request(kw))  # planned once: the handover and the load below both use it
    if not qwenhw_server:
        handover = _engine_server(chosen, host, port, api_key, served_model_name or model)
        if handover is not None:
            return _run_engine_server(*handover)
    try:  # bind before the (long) load, so a taken port fails at once
        queue = {"max_queue": max_queue} if max_queue else {}  # else the scheduler's MAX_QUEUE
        server = make_server(None, host, port, api_key, served_model_name or model, access_log=True, **queue)
    except OSError as exc:
        raise BadInput(f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Pick another --port.") from exc
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with _load(chosen, kw) as engine:
            server.engine = engine
            lock = "requires an API key" if api_key else "no API key"
            together = (f"up to {engine.max_batch} requests decoded together" if engine.max_batch > 1
                        else "one request decoded at a time")
            click.echo(f"qwenhw: serving {server.names[0]!r} at {server.url} ({lock}; "
                       f"{server.context_limit} tokens of context per request; {together}). Ctrl-C stops.", err=True)
            if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
                click.echo(f"qwenhw: warning: {host} is reachable from other machines and no --api-key is set.",
                           err=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                click.echo("qwenhw: stopped", err=True)
    finally:
        server.server_close()


def _engine_server(chosen: Any, host: str, port: int, api_key: str | None,
                   name: str) -> tuple[Any, list[str], dict[str, str], str] | None:
    """The chosen plan's own server (its backend's `server`), if it has one: (plan, argv, env, url)."""
    if not chosen.fits:
        return None  # the usual path says why
    backend = plugins.load().backends.get(chosen.backend)
    if backend is None:
        return None
    if port == 0:
        from .engine.ranks import free_port

        port = free_port(host)
    found = backend.server(chosen, host, port, api_key, name)
    if found is None:
        return None
    shown = f"[{host}]" if ":" in host else host
    return chosen, found[0], found[1], f"http://{shown}:{port}/v1"


def _run_engine_server(plan: Any, argv: list[str], env: dict[str, str], url: str) -> None:
    """Run the engine's own server in the foreground until it exits or Ctrl-C."""
    import signal
    import subprocess

    click.echo(f"qwenhw: {plan.model} with {plan.backend} ({plan.engine}), {plan.parallel}: its own OpenAI server "
               f"at {url} (starting; --qwenhw-server serves with qwenhw's instead). Ctrl-C stops.", err=True)
    proc = subprocess.Popen(argv, env={**os.environ, **env})
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        click.echo("qwenhw: stopped", err=True)
        return
    if code:
        raise QwenhwError(f"{plan.backend}'s server exited with status {code}; its output above says why.")


@main.command()
@click.option("--path", type=click.Path(file_okay=False), help="Where to build the tiny checkpoint.")
@click.option("--skip-chat", is_flag=True, help="Only plan; do not load the model.")
@friendly
def demo(path: str | None, skip_chat: bool) -> None:
    """The whole path on a tiny real-architecture Qwen3-MoE: detect, plan, load, chat, and what this
    machine could run among the real Qwen models."""
    from .demo import run_demo

    run_demo(path, skip_chat=skip_chat)


if __name__ == "__main__":  # pragma: no cover
    main()
