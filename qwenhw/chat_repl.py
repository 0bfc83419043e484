"""`qwenhw chat`: an interactive conversation over any Engine, streamed, with Qwen3's thinking switches.

`/think` and `/no_think` alone on a line switch the mode for the turns that follow; inside a message they are
Qwen's soft switches and decide that turn only. Reasoning is shown dimmed, apart from the answer, and is not
kept in the history (Qwen's advice: earlier turns carry answers only). Ctrl-C stops a reply, not the session.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

from .engine.base import Engine
from .engine.thinking import resolve_mode, soft_switch

HELP = """commands:
  /think, /no_think       thinking on / off for the next turns (inside a message: that turn only)
  /reset                  forget the conversation
  /set max_tokens N       longest reply; /set temperature T (0 = greedy)
  /help                   this list
  /exit                   leave (or Ctrl-D); Ctrl-C stops a reply"""


class ChatSession:
    """The conversation state, apart from any terminal: what each turn sends and what history keeps."""

    def __init__(self, engine: Engine, thinking: bool | None = None, max_tokens: int = 1024,
                 temperature: float | None = None, system: str | None = None):
        self.engine = engine
        self.thinking = thinking  # None: the model's default (Qwen3 hybrids think)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system = system
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": text}]

    def turn_thinking(self, text: str) -> bool | None:
        """The mode passed to the engine: a soft switch in the message wins over the session's mode."""
        switch = soft_switch([{"role": "user", "content": text}])
        return self.thinking if switch is None else switch

    def thinks(self, text: str) -> bool:
        return resolve_mode(self.turn_thinking(text), self.messages(text), self.engine.model_thinking)[0]

    def send(self, text: str) -> Iterator[tuple[str, str]]:
        """Stream ("reasoning" | "content", text). The turn enters the history only once it completes."""
        answer: list[str] = []
        stream = self.engine.chat_stream(self.messages(text), thinking=self.turn_thinking(text),
                                         max_tokens=self.max_tokens, temperature=self.temperature)
        try:
            for kind, piece in stream:
                if kind == "content":
                    answer.append(piece)
                yield kind, piece
        finally:
            stream.close()  # stopped early (Ctrl-C): this ends the generation and frees the engine
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": "".join(answer).strip()}]


def print_stream(console: Any, pieces: Iterable[tuple[str, str]]) -> None:
    """Reasoning dimmed, then a blank line, then the answer. The template's newlines around the think tags
    are trimmed: whitespace is held back until more text of the same kind follows."""
    last, held, printed, fresh = None, "", False, True
    for kind, text in pieces:
        if kind != last:
            if printed:
                console.print("\n\n", end="")  # reasoning ends: set the answer apart
            last, held, fresh = kind, "", True
        text = held + text
        if fresh:
            text = text.lstrip()
        body = text.rstrip()
        held = text[len(body):]
        if body:
            console.print(body, end="", style="dim" if kind == "reasoning" else None, markup=False)
            printed, fresh = True, False


def run_chat(engine: Engine, session: ChatSession, console: Any) -> None:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass
    p = engine.plan
    console.print(f"[bold]{getattr(p, 'model', 'model')}[/bold] ready. /help for commands, Ctrl-D to leave.",
                  highlight=False)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:  # at the prompt: like a shell, a fresh line
            console.print("\n[dim](Ctrl-D or /exit to leave)[/dim]")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and _command(text, session, console):
            if text.split()[0] in ("/exit", "/quit", "/bye"):
                return
            continue
        _reply(text, session, console)


def _reply(text: str, session: ChatSession, console: Any) -> None:
    mode = "think" if session.thinks(text) else "no_think"
    start = time.perf_counter()
    stream = session.send(text)
    try:
        print_stream(console, stream)
    except KeyboardInterrupt:
        stream.close()
        console.print("\n[yellow]stopped[/yellow] [dim](this turn is not kept)[/dim]")
        return
    finally:
        stream.close()
    console.print(f"\n[dim]\\[{mode} · {time.perf_counter() - start:.1f} s][/dim]")


def _command(text: str, session: ChatSession, console: Any) -> bool:
    """Handle a REPL command; False when the line is a message that merely starts with '/'."""
    words = text.split()
    head = words[0]
    if head in ("/exit", "/quit", "/bye"):
        return True
    if head in ("/think", "/no_think") and len(words) == 1:
        session.thinking = head == "/think"
        console.print(f"[dim]thinking {'on' if session.thinking else 'off'}[/dim]")
    elif head in ("/reset", "/clear") and len(words) == 1:
        session.reset()
        console.print("[dim]history cleared[/dim]")
    elif head in ("/help", "/?"):
        console.print(HELP, markup=False, highlight=False)
    elif head == "/set":
        _set(words[1:], session, console)
    elif len(words) == 1 and "/" not in head[1:] and head not in ("/think", "/no_think"):
        console.print(f"[red]unknown command {head}[/red] (see /help)")
    else:
        return False  # "/think why is..." is a soft switch inside a message; "/usr/bin is..." is text
    return True


def _set(args: list[str], session: ChatSession, console: Any) -> None:
    try:
        name, value = args
        if name == "max_tokens" and int(value) >= 1:
            session.max_tokens = int(value)
        elif name == "temperature" and 0 <= float(value) <= 2:
            session.temperature = float(value)
        else:
            raise ValueError
    except ValueError:
        console.print("[red]usage:[/red] /set max_tokens N (N >= 1) | /set temperature T (0 to 2)")
        return
    console.print(f"[dim]{name} = {value}[/dim]")
