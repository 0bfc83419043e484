"""Issue #9 benchmark: Qwen3-30B-A3B shape, random bf16 weights, on 1, 2 or 4 GPUs of one host.

    torchrun --nproc_per_node 2 bench/multi_gpu.py --out results/      (2 GPUs, ~2 minutes)
    torchrun --nproc_per_node 4 bench/multi_gpu.py --model 235b --out results/   (4x 141 GB GPUs)

The 235B run builds each rank's TP+EP shard directly (470 GB of bf16 fit no single GPU): TP=4 attention +
EP=4 experts only, per-GPU memory against the planner. Before the rows, rank 0 checks the fused MoE decode
kernel (kernels.moe.experts) against transformers' grouped experts kernel and sweeps its tile shapes; the
all-reduce of one decode step's hidden states is timed inside CUDA graphs, NCCL against symmetric memory.

Side by side, batch 1 and batch 16 greedy decode:
  1. one GPU: qwenhw's fast path (the single-GPU best);
  2. accelerate's layer split over all GPUs (HF generate; the naive baseline; not with --fused-only);
  3. qwenhw's multi-GPU layouts: tensor-parallel attention with whole experts per GPU and/or every expert
     split (--experts), one process per GPU, the all-reduces over symmetric memory, CUDA graphs per decode
     step; data-parallel replicas (a whole model per GPU, or TP=2 pairs on 4 GPUs), each decoding its share
     of the batch;
with per-GPU peak memory next to the planner's prediction (--worst-prefill: after the largest prefill the
plan reserves for) and logits against the single-GPU run. Throughput is tokens per second over all
sequences; latency is per sequence (batch 1). --only-moe times each MoE kernel alone per layout's experts;
--default-tiles runs what qwenhw runs (no sweep). The rows' kernel switches are KernelConfig variants of the
QWENHW_* environment at start; tile shapes change only inside kernels.tiles.override, around each runtime
(its CUDA graphs keep the tiles they were captured with).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "native"), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GiB = 2**30


def log(*a):
    print(*a, flush=True)


def random_prompts(batch: int, length: int) -> list[list[int]]:
    """The same token ids for every timed row and profile (seed 1)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 151936, (batch, length), generator=g).tolist()


def decode_rate(rt, batch: int, tokens: int, repeats: int, prompt_len: int = 32, barrier=None) -> float:
    """Median tokens/s over all sequences of greedy decoding, after one untimed run (graph capture).
    `barrier`: start every timed run together with the other replicas (data parallel)."""
    prompts = random_prompts(batch, prompt_len)
    rates = []
    for r in range(repeats + 1):
        rt.reset()
        tok = rt.prefill(prompts).argmax(-1)
        torch.cuda.synchronize()
        if barrier is not None:
            barrier()
        t = time.perf_counter()
        for _ in range(tokens):
            tok = rt.decode(tok).argmax(-1)
        torch.cuda.synchronize()
        if r:
            rates.append(batch * tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def kernel_census(model, context: int, kernels=None) -> dict:
    """CUDA kernels one eager batch-1 decode step launches (a graph replays the same ones), by name."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from qwenhw_native.runtime import Runtime

    rt = Runtime(model, max_len=context, device="cuda:0", graphs=False, decode_experts="grouped_mm",
                 kernels=kernels)
    with torch.inference_mode():
        tok = rt.prefill(list(range(100, 132))).argmax(-1)
        rt.decode(tok)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            rt.decode(tok)
            torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type.name == "CUDA")
    return {"kernels_per_step": sum(names.values()), "top": names.most_common(25)}


def step_profile(rt, batch: int, steps: int = 4, prompt_len: int = 32) -> dict:
    """Where a captured decode step's time goes: device microseconds per step by kernel (CUPTI records the
    kernels a CUDA graph replays), the sum of them, and the step's wall time over the same steps."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(batch, prompt_len)
    rt.reset()
    tok = rt.decode(rt.prefill(prompts).argmax(-1)).argmax(-1)  # graphs captured before the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            tok = rt.decode(tok).argmax(-1)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    us: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name.split("(")[0][:80]
            us[name] += e.device_time / steps
            calls[name] += 1
    top = sorted(us.items(), key=lambda kv: -kv[1])[:20]
    rt.reset()
    return {"step_wall_us": wall * 1e6, "kernel_sum_us": sum(us.values()),
            "kernels_per_step": sum(calls.values()) / steps,
            "top": [[name, round(t, 1), calls[name] // steps] for name, t in top]}


def graph_time(fn, calls: int = 20, replays: int = 20) -> float:
    """Median seconds per call of `fn`, `calls` of them captured in one CUDA graph (launch cost excluded)."""
    from qwenhw_native.graphs import capture as _capture

    graph, _ = _capture(lambda: [fn() for _ in range(calls)][-1])
    times = []
    for _ in range(replays):
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


MOE_SHARES = {"1": (1, "ep"), "ep2": (2, "ep"), "ep4": (4, "ep"), "tp2": (2, "tp"), "tp4": (4, "tp")}
# gate/up: (BN, BK, warps, stages[, split of the hidden size]); down: (BN, BK, warps, stages)
MOE_UP_BLOCKS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4), (32, 128, 4, 3),
                 (64, 128, 4, 3, 2), (64, 128, 4, 3, 4), (128, 128, 8, 3, 2)]
MOE_DOWN_BLOCKS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3),
                   (32, 128, 4, 3), (128, 64, 4, 4)]
MOE_COPIES = 4  # consecutive timed calls use different weights, as consecutive layers do (no L2 reuse)


def moe_kernel_check(hidden: int = 2048, inter: int = 768, n_exp: int = 128, top_k: int = 8,
                     shares: tuple[str, ...] = tuple(MOE_SHARES), kernels=None, tokens: tuple[int, ...] = (1, 16)) -> dict:
    """The fused MoE decode kernels against transformers' grouped_mm experts (same module, same routing),
    for one rank's experts of each layout: all (1 GPU), whole experts of one EP rank ("ep2", "ep4"), or
    every expert's 1/2 or 1/4 of the intermediate size ("tp2", "tp4"); at each of `tokens` (1 and 16).
    Each kernel is timed alone inside CUDA graphs: the gate/up kernel for every MOE_UP_BLOCKS shape, then
    the down kernel for every MOE_DOWN_BLOCKS shape, then the sum; the fastest pair is timed whole (and
    checked against transformers) next to the default. `best[share][tokens]`: {"block", "down_block"}.
    The kernels launch as a decode step's would (`kernels`: PDL, and a program per local expert or not)."""
    from functools import partial

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import common, moe, tiles

    kernels = kernels or KernelConfig.resolve()
    dev = torch.device("cuda", torch.cuda.current_device())
    launch = dict(pdl=kernels.pdl and common.pdl_supported(dev), every_expert=not kernels.moe_slots)
    moe_call, moe_experts = partial(moe.MoeCall, **launch), partial(moe.experts, **launch)
    torch.manual_seed(0)
    out: dict = {"cases": [], "best": {}}
    for key in shares:
        ways, mode = MOE_SHARES[key]
        local = n_exp // ways if mode == "ep" else n_exp
        part = inter // ways if mode == "tp" else inter
        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=part, num_experts=n_exp,
                             num_experts_per_tok=top_k)
        cfg._experts_implementation = "grouped_mm"
        copies = []
        for _ in range(MOE_COPIES):
            with torch.device("meta"):
                ex = Qwen3MoeExperts(cfg)
            ex.gate_up_proj = torch.nn.Parameter(
                (torch.randn(local, 2 * part, hidden, device="cuda") * 0.02).bfloat16(), requires_grad=False)
            ex.down_proj = torch.nn.Parameter((torch.randn(local, hidden, part, device="cuda") * 0.02).bfloat16(),
                                              requires_grad=False)
            ex.num_experts = local
            ex._is_expert_parallel = local < n_exp  # ids >= local: transformers' sentinel slot, skipped
            copies.append(ex)
        ex = copies[0]
        out["best"][key] = {}
        for t in tokens:
            x = torch.randn(t, hidden, device="cuda").bfloat16()
            routes = [torch.stack([torch.randperm(n_exp, device="cuda")[:top_k] for _ in range(t)])
                      for _ in range(MOE_COPIES)]
            idx = routes[0]
            w = torch.softmax(torch.randn(t, top_k, device="cuda"), -1).bfloat16()
            touched = sum(int(r[r < local].unique().numel()) for r in routes) / MOE_COPIES * 3 * hidden * part * 2
            case = {"share": key, "experts_local": local, "inter_local": part, "tokens": t, "up": [], "down": []}

            def timed(make, step):
                """Median seconds of `step` over calls rotating through the copies (calls made up front)."""
                calls = [make(copies[i % MOE_COPIES], routes[i % MOE_COPIES]) for i in range(MOE_COPIES * 5)]
                it = iter(range(10 ** 9))
                return graph_time(lambda: step(calls[next(it) % len(calls)]), calls=len(calls))

            with torch.inference_mode():
                mine = idx < local
                ref = ex(x, torch.where(mine, idx, torch.full_like(idx, local)), w * mine)
                try:
                    case["transformers_us"] = 1e6 * graph_time(
                        lambda: ex(x, torch.where(mine, idx, torch.full_like(idx, local)), w * mine))
                except Exception:  # noqa: BLE001 - the reference kernel failing to capture is not our result
                    case["transformers_us"] = float("nan")
                for block in MOE_UP_BLOCKS:
                    try:
                        dt = timed(lambda e, r: moe_call(x, e, r, w, block=block), moe.MoeCall.gate_up)
                        case["up"].append({"block": block, "us": dt * 1e6})
                    except Exception as exc:  # a tile shape this GPU cannot compile
                        case["up"].append({"block": block, "error": f"{type(exc).__name__}: {exc}"[:200]})
                up = min((r for r in case["up"] if "us" in r), key=lambda r: r["us"])["block"]
                for block in MOE_DOWN_BLOCKS:
                    try:
                        def make(e, r, block=block):
                            call = moe_call(x, e, r, w, block=up, down_block=block)
                            call.gate_up()
                            return call
                        dt = timed(make, moe.MoeCall.down)
                        case["down"].append({"block": block, "us": dt * 1e6})
                    except Exception as exc:
                        case["down"].append({"block": block, "error": f"{type(exc).__name__}: {exc}"[:200]})
                down = min((r for r in case["down"] if "us" in r), key=lambda r: r["us"])["block"]

                def make_sum(e, r):
                    call = moe_call(x, e, r, w, block=up, down_block=down)
                    call.gate_up()
                    call.down()
                    return call
                case["sum_us"] = 1e6 * timed(make_sum, moe.MoeCall.sum)
                default = tiles.for_device(dev).moe_block
                for name, (b_up, b_down) in (("default", (default, None)), ("best", (up, down))):
                    got = moe_experts(x, ex, idx, w, block=b_up, down_block=b_down)
                    dt = timed(lambda e, r: (e, r), lambda c: moe_experts(x, c[0], c[1], w, block=b_up,
                                                                          down_block=b_down))
                    case[name] = {"block": list(b_up), "down_block": list(b_down or b_up[:4]), "us": dt * 1e6,
                                  "gb_s": touched / dt / 1e9,
                                  "rel_err": float((got.float() - ref.float()).norm() / max(ref.float().norm(), 1e-6))}
            ok = case["best"]["rel_err"] < 0.02
            out["best"][key][t] = {"block": list(up), "down_block": list(down)} if ok else None
            out["cases"].append(case)
            log(json.dumps({k: v for k, v in case.items() if k not in ("up", "down")}))

    out["max_rel_err"] = max(max(c["best"]["rel_err"], c["default"]["rel_err"]) for c in out["cases"])
    return out


def moe_block_for(check: dict, share: str, tokens: int) -> dict | None:
    """The fastest tile shapes the sweep found for this layout's experts at this batch (None: not swept)."""
    best = (check or {}).get("best") or {}
    return (best.get(share) or {}).get(tokens) or (best.get(share) or {}).get(str(tokens))


def attention_check(heads: int = 32, kv_heads: int = 4, head_dim: int = 128, kernels=None) -> list[dict]:
    """The split-KV decode attention (kernels.attention.decode_attention) against SDPA over the masked static
    cache, as the runtime called it before: error, and time per layer at a few cache sizes and positions."""
    import torch.nn.functional as F

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import attention, common

    kernels = kernels or KernelConfig.resolve()
    pdl = kernels.pdl and common.pdl_supported(torch.device("cuda", torch.cuda.current_device()))
    rows = []
    # (128, 2048, 1200): a serving step's rows and contexts (1024-token prompts, answers half done)
    for b, max_len, pos in ((1, 1024, 64), (16, 1024, 64), (16, 8192, 64), (16, 8192, 8000), (1, 32768, 64),
                            (128, 2048, 1200)):
        q = torch.randn(b, heads, 1, head_dim, device="cuda").bfloat16()
        kc, vc = (torch.randn(b, kv_heads, max_len, head_dim, device="cuda").bfloat16() for _ in range(2))
        p = torch.tensor([pos], device="cuda")
        mask = torch.zeros(1, 1, 1, max_len, device="cuda", dtype=torch.bfloat16)
        mask[..., pos + 1:] = float("-inf")
        scale = head_dim ** -0.5

        def sdpa():
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)

        with torch.inference_mode():
            ref = sdpa().transpose(1, 2).reshape(b, 1, -1).float()
            got = attention.decode_attention(q, kc, vc, p, scale, pdl=pdl).float()
            row = {"batch": b, "max_len": max_len, "pos": pos, "rel_err": float((got - ref).norm() / ref.norm()),
                   "fused_us": graph_time(lambda: attention.decode_attention(q, kc, vc, p, scale, pdl=pdl)) * 1e6,
                   "sdpa_us": graph_time(sdpa) * 1e6}
            if b == 16:  # which tiles are fastest (the default is the first)
                row["sweep_us"] = {}
                for block in ((64, 4, 3), (64, 4, 2), (128, 4, 2), (128, 8, 2), (32, 4, 3), (64, 8, 3)):
                    try:
                        t = graph_time(lambda: attention.decode_attention(q, kc, vc, p, scale, block=block, pdl=pdl))
                        row["sweep_us"][str(block)] = t * 1e6
                    except Exception as exc:  # a tile shape this GPU cannot compile
                        row["sweep_us"][str(block)] = f"{type(exc).__name__}"
            rows.append(row)
    return rows


def allreduce_check(group, world: int, hidden: int, kernels=None) -> list[dict]:
    """Per-call latency of summing [batch, hidden] bf16 over the group inside a CUDA graph; and of the sum
    followed by the next RMSNorm, as two kernels (torch's one-shot, then the norm) and as one
    (Reducer.reduce_norm), which is checked against the two first."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import common, tiles
    from qwenhw_native.reducer import Reducer
    from qwenhw_native.step import rms_norm

    kernels = kernels or KernelConfig.resolve()
    rows = []
    rank = dist.get_rank(group)
    for b in (1, 16):
        x = torch.ones(b, hidden, dtype=torch.bfloat16, device="cuda")
        pdl = kernels.pdl and common.pdl_supported(x.device)  # as a decode step launches the fused kernel
        red = Reducer(group, b * hidden, torch.bfloat16, x.device, kernels=kernels)
        y = x.clone()
        red(y)
        ok = bool((y == world).all())
        z = red(red.buffer_like(x).fill_(1.0))  # the runtime's way: the producer writes into the buffer
        ok = ok and bool((z == world).all())
        dist.barrier()  # each timed call includes its producer (a fill) on both paths
        t_sym = graph_time(lambda: red(red.buffer_like(x).fill_(1.0)), calls=50)
        dist.barrier()
        t_copy = graph_time(lambda: red(x.fill_(1.0)), calls=50)
        dist.barrier()
        t_nccl = graph_time(lambda: dist.all_reduce(x.fill_(1.0), group=group), calls=50)
        row = {"batch": b, "reducer": red.path, "reducer_us": t_sym * 1e6, "reducer_with_copy_us": t_copy * 1e6,
               "nccl_us": t_nccl * 1e6, "reducer_sum_correct": ok}
        if red.handle is not None:
            g = torch.Generator(device="cuda").manual_seed(7)
            base = torch.randn(b, hidden, generator=g, device="cuda").bfloat16()
            part = (base.float() * (rank + 1)).bfloat16()
            norm = Qwen3MoeRMSNorm(hidden, eps=1e-6).cuda().bfloat16()
            norm.weight.data.normal_(1.0, 0.1, generator=g)
            red.restart()
            with torch.inference_mode():
                h2 = red(red.buffer_like(part).copy_(part))
                x2 = rms_norm(norm, h2)
                h1, x1 = red.reduce_norm(red.buffer_like(part).copy_(part), norm, pdl=pdl)
                torch.cuda.synchronize()
                row["fused_h_equal"] = bool(torch.equal(h1, h2))
                row["fused_norm_rel_err"] = float((x1.float() - x2.float()).norm() / x2.float().norm())
                red.restart()
                dist.barrier()
                row["reduce_then_norm_us"] = graph_time(
                    lambda: rms_norm(norm, red(red.buffer_like(part).copy_(part))), calls=50) * 1e6
                # the one-shot kernel (barrier, then reads), side by side
                pull = Reducer(group, b * hidden, torch.bfloat16, x.device,
                               kernels=dataclasses.replace(kernels, push_reduce=False))
                h3, x3 = pull.reduce_norm(pull.buffer_like(part).copy_(part), norm, pdl=pdl)
                torch.cuda.synchronize()
                row["pull_reducer"] = pull.path
                row["pulled_h_equal"] = bool(torch.equal(h3, h2)) and bool(torch.equal(x3, x1))
                for key, r in (("fused_reduce_norm_us", red), ("pulled_reduce_norm_us", pull)):
                    row[key] = {}
                    for per in sorted({1, 2, 4, 8, b} & set(range(1, b + 1))):  # token rows per program
                        r.restart()
                        dist.barrier()
                        with tiles.override(x.device, reduce_rows=per):  # around the capture
                            row[key][per] = graph_time(
                                lambda: r.reduce_norm(r.buffer_like(part).copy_(part), norm, pdl=pdl), calls=50) * 1e6
        rows.append(row)
    return rows


EXPERT_MODES = {"ep": "EP={n} experts", "tp": "experts split {n} ways", "replicated": "all experts on each GPU, dealt"}


def build_sharded(cfg, rank: int, world: int, device: str, experts: str = "ep"):
    """This rank's TP shard of a random-weight model (sharding.empty_shard: the whole model need not fit
    anywhere). Replicated weights come out equal on every rank: same seed, same shapes, same order."""
    from qwenhw_native.sharding import empty_shard

    model, _ = empty_shard(cfg, rank, world, device, torch.bfloat16, experts)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)  # 1-D: the RMSNorm weights
    return model.eval()


def config_235b(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=64,
                          num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960, tie_word_embeddings=False, rope_theta=1e6)


def memory_point(label: str, device: int, model=None) -> dict:
    """This process's allocator state on `device` (GiB): what is live, reserved, and reserved but unusable."""
    st = torch.cuda.memory_stats(device)
    point = {"at": label, "allocated": st["allocated_bytes.all.current"] / GiB,
             "reserved": st["reserved_bytes.all.current"] / GiB, "peak_reserved": st["reserved_bytes.all.peak"] / GiB,
             "peak_allocated": st["allocated_bytes.all.peak"] / GiB,
             "inactive_split": st["inactive_split_bytes.all.current"] / GiB, "segments": st["segment.all.current"]}
    if model is not None:
        point["parameters"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
        point["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers()) / GiB
    return point


def worst_prefill(rt, batch: int, context: int) -> None:
    """Prefill `batch` prompts as long as the planner reserves activations for (min(context, PREFILL_CHUNK)
    tokens each), so the peak memory that follows is the one the plan is for (--worst-prefill)."""
    from qwenhw_native.limits import PREFILL_CHUNK

    n = min(context, PREFILL_CHUNK) - 1  # the cache keeps one slot for the first decode step
    g = torch.Generator().manual_seed(2)
    rt.reset()
    with torch.inference_mode():
        rt.prefill(torch.randint(0, 151936, (batch, n), generator=g).tolist())
    torch.cuda.synchronize()
    rt.reset()


def long_prefill_check(model, lengths: tuple[int, ...] = (4500, 2500), context: int = 8192, kernels=None) -> dict:
    """Prompts longer than the runtime's prefill chunk go one sequence and one chunk at a time; against
    one pass over the padded batch: last-token logits, greedy tokens, and the memory each prefill took
    above the runtime's (activations: the planner reserves them for PREFILL_CHUNK tokens per sequence)."""
    import qwenhw
    from qwenhw.planning.footprint import gpu_activation_bytes
    from qwenhw_native.limits import PREFILL_CHUNK
    from qwenhw_native.runtime import Runtime, SampleParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 151936, (n,), generator=g).tolist() for n in lengths]
    out: dict = {"lengths": list(lengths), "chunk": PREFILL_CHUNK}
    runs = {}
    for name, chunk in (("one pass", 10 ** 9), ("chunked", PREFILL_CHUNK)):
        rt = Runtime(model, max_len=context, device="cuda:0", graphs=True, decode_experts="grouped_mm",
                     batch=len(prompts), kernels=kernels)
        rt.prefill_chunk = chunk
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        with torch.inference_mode():
            logits = rt.prefill(prompts).float().cpu()
            tokens = rt.generate_batch(prompts, 8, SampleParams(), set())
        torch.cuda.synchronize()
        runs[name] = (logits, tokens)
        out[f"{name}: peak above the runtime GiB"] = (torch.cuda.max_memory_allocated(0) - base) / GiB
        del rt
        gc.collect()
        torch.cuda.empty_cache()
    (a, ta), (b, tb) = runs["one pass"], runs["chunked"]
    out["logits_rel_err"] = float((a - b).norm() / a.norm())
    out["greedy_equal"] = ta == tb
    spec = qwenhw.models.get("Qwen3-30B-A3B").with_(num_layers=len(model.model.layers))
    out["planner reserve GiB (concurrency 2)"] = gpu_activation_bytes(spec, context, len(prompts), PREFILL_CHUNK) / GiB
    return out


def peak_gib(device: int, nontorch: float) -> float:
    return (torch.cuda.max_memory_reserved(device) + nontorch) / GiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("30b", "235b"), default="30b",
                    help="235b: Qwen3-235B-A22B's shape, TP+EP over all GPUs only (needs ~120 GB per GPU at 4)")
    ap.add_argument("--layers", type=int, default=None, help="default: the model's (48 / 94)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--accelerate-tokens", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only-tp", action="store_true", help="only the TP+EP layout over all GPUs (memory traces)")
    ap.add_argument("--worst-prefill", action="store_true",
                    help="after timing, prefill the longest prompts the plan reserves memory for (1 GPU and TP rows), "
                         "so the peak memory is comparable with the planner's")
    ap.add_argument("--only-reduce", action="store_true",
                    help="only the all-reduce checks (a quick run before the rest, under a timeout)")
    ap.add_argument("--only-moe", action="store_true", help="only the MoE kernel sweep (rank 0)")
    ap.add_argument("--experts", default="ep,tp",
                    help="how the TP rows hold the MoE layers: ep (whole experts per GPU), tp (every expert split), "
                         "replicated (every expert on every GPU, dealt out per step); the first also runs the "
                         "reduce-and-norm-apart rows and the DP x TP layout")
    ap.add_argument("--long-prefill", action="store_true",
                    help="1 GPU: prompts longer than the prefill chunk, chunked against one pass (logits, memory)")
    ap.add_argument("--nccl", action="store_true", help="also the TP rows over NCCL all-reduces")
    ap.add_argument("--no-attention", action="store_true", help="skip the decode-attention kernel check")
    ap.add_argument("--moe-from", default=None, help="the MoE sweep's JSON from an --only-moe run (not swept again)")
    ap.add_argument("--default-tiles", action="store_true",
                    help="rows on qwenhw's own MoE tile shapes (this GPU's kernels.tiles: what qwenhw runs), "
                         "not the sweep's fastest")
    ap.add_argument("--profile", action="store_true", help="kernel times of a batch-16 decode step (1 GPU, TP rows)")
    ap.add_argument("--fused-only", action="store_true",
                    help="1-GPU rows on the fused kernels only (not also transformers' experts and torch ops), "
                         "and no accelerate layer split")
    ap.add_argument("--down-prefetch", type=int, default=None,
                    help="Tiles.moe_down_prefetch: weight lines per row the down kernel prefetches under PDL (0: none)")
    ap.add_argument("--pull-too", action="store_true",
                    help="TP rows also with the one-shot reduce + norm kernel (KernelConfig.push_reduce off), "
                         "side by side")
    ap.add_argument("--linear-too", action="store_true",
                    help="1-GPU and TP rows also with the decode projections on cuBLAS (KernelConfig.linear off), "
                         "side by side with qwenhw's Triton decode GEMMs; 1-GPU rows also with torch's RMSNorms "
                         "(KernelConfig.norm off) instead of the router and MoE-sum kernels applying them")
    ap.add_argument("--no-router-kernel", action="store_true",
                    help="the router GEMM on cuBLAS and the routing kernel apart (Tiles.router_max_tokens = 0)")
    ap.add_argument("--write-tiles", action="store_true",
                    help="rank 0 saves the tiles the rows run with (the all-reduce sweep's fastest rows per program, "
                         "--down-prefetch, --no-router-kernel; not the MoE sweep's shapes, which differ by layout and "
                         "batch) as this GPU's tiles file (kernels/configs/), which qwenhw then runs with")
    args = ap.parse_args()
    big = args.model == "235b"
    args.layers = args.layers or (94 if big else 48)
    batches = [int(b) for b in args.batches.split(",")]

    from moe_offload import build
    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import common, tiles
    from qwenhw_native.sharding import replica_group, shard
    from qwenhw_native.runtime import Runtime, SampleParams, set_experts

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # the user's QWENHW_* switches, read once; the rows run variants of it (fused_reduce off: every row reduces
    # and norms apart)
    base = KernelConfig.resolve()
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    # tiles the whole run uses: held until the process ends (each runtime's override nests inside)
    overrides = contextlib.ExitStack()
    changes = {"moe_down_prefetch": args.down_prefetch} if args.down_prefetch is not None else {}
    if args.no_router_kernel:
        changes["router_max_tokens"] = 0
    run_tiles = overrides.enter_context(tiles.override(dev, **changes))
    extra_pdl = {"pdl": base.pdl and common.pdl_supported(dev), "down_prefetch": run_tiles.moe_down_prefetch,
                 "router_kernel_up_to": run_tiles.router_max_tokens}
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    nontorch = (total - free) - torch.cuda.memory_reserved()
    rows: list[dict] = []
    extra: dict = {"device": torch.cuda.get_device_name(0), "model": args.model, "layers": args.layers,
                   "worst_prefill": args.worst_prefill, **extra_pdl}
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(0, 151936, (1, 32), generator=g)

    # --- the fused MoE decode kernel: right, and its fastest tile shapes here (rank 0; all ranks use them) --
    if rank == 0 and args.moe_from:
        extra["moe_kernel"] = json.loads(Path(args.moe_from).read_text())
    elif rank == 0 and args.default_tiles:  # the rows check the kernels (HF's greedy tokens, TP logits)
        extra["moe_kernel"] = {"best": {}, "max_rel_err": 0.0, "note": "not swept (--default-tiles)"}
    elif rank == 0 and not args.only_reduce:
        try:
            shape = (4096, 1536) if big else (2048, 768)
            extra["moe_kernel"] = moe_kernel_check(*shape, kernels=base)
        except Exception as exc:
            extra["moe_kernel"] = {"error": f"{type(exc).__name__}: {exc}"[:500], "best": {}, "max_rel_err": None}
        log(json.dumps({"moe_kernel": extra["moe_kernel"]}))
        if args.only_moe:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "moe_kernel.json").write_text(json.dumps(extra["moe_kernel"], indent=2))
    if args.only_moe:
        dist.destroy_process_group()
        return
    verdict = [extra.get("moe_kernel")]
    dist.broadcast_object_list(verdict, src=0)
    check = verdict[0] or {"best": {}, "max_rel_err": None}
    if not args.only_reduce and not (check["max_rel_err"] is not None and check["max_rel_err"] < 0.02):
        base = dataclasses.replace(base, moe=False)  # the rows still run, on transformers' experts kernels

    @contextlib.contextmanager
    def use_block(share: str, batch: int):
        """Each layout's rows run on the tile shapes the sweep found fastest for its experts and batch (none
        found: this GPU's own); it yields them, None where the MoE kernels are off. Around the runtime's
        build and decoding: its CUDA graphs keep the tiles they were captured with."""
        found = {} if args.default_tiles else moe_block_for(check, share, 1 if batch == 1 else 16) or {}
        blocks = {"moe_block": tuple(found["block"]),
                  "moe_down_block": tuple(found["down_block"]) if found.get("down_block") else None} if found else {}
        with tiles.override(dev, **blocks) as t:
            yield {"block": t.moe_block, "down_block": t.moe_down_block} if base.moe else None

    if rank == 0 and not big and not args.only_reduce and not args.no_attention:
        try:
            extra["attention"] = attention_check(kernels=base)
        except Exception as exc:
            extra["attention"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(json.dumps({"attention": extra["attention"]}))
    if world > 1:
        try:
            extra["allreduce"] = allreduce_check(dist.group.WORLD, world, 4096 if big else 2048, kernels=base)
        except Exception as exc:
            extra["allreduce"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if rank == 0:
            log(json.dumps({"allreduce": extra["allreduce"]}))
        sweep = next((r.get("fused_reduce_norm_us") for r in extra["allreduce"] if r.get("batch") == 16), None) \
            if isinstance(extra["allreduce"], list) else None
        if sweep:  # the fastest rows per program at batch 16, the same on every rank (rank 0's timing)
            best = [min(sweep, key=sweep.get)]
            dist.broadcast_object_list(best, src=0)
            extra["reduce_rows"] = best[0]
            overrides.enter_context(tiles.override(dev, reduce_rows=best[0]))
    if args.write_tiles and rank == 0:
        log(f"tiles written: {tiles.write(torch.cuda.get_device_name(dev), tiles.for_device(dev))}")
    if world > 1 and args.only_reduce:
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"allreduce_{world}.json").write_text(json.dumps(extra["allreduce"], indent=2))
        dist.destroy_process_group()
        return

    # --- 1 GPU and accelerate's layer split: rank 0 alone, the other GPUs idle ---------------------
    ref = None
    census = None
    if rank == 0 and not big and not args.only_tp:
        model = build(args.layers, "cuda:0")
        with torch.inference_mode():
            ref = model(probe.cuda()).logits[0, -1].float().cpu()
        with torch.inference_mode():
            hf_greedy = model.generate(probe.cuda(), max_new_tokens=16, do_sample=False)[0, 32:].tolist()
        step_logits = {}
        moe_on = base.moe
        # all decode kernels (qwenhw_native.kernels); the same without the MoE one; torch ops only
        # (label, KernelConfig's triton, moe, linear, norm)
        variants = [("", True, True, True, True)] if moe_on else []
        if args.linear_too and moe_on:  # the Triton projections and the norms in the router / sum kernels, A/B
            variants += [(", cuBLAS projections", True, True, False, True), (", torch norms", True, True, True, False),
                         (", cuBLAS projections, torch norms", True, True, False, False)]
        if not args.fused_only or not moe_on:
            variants += [(", transformers experts" if moe_on else "", True, False, True, True),
                         (", unfused (torch ops)", False, False, True, True)]
        for b in batches:
            with use_block("1", b) as block:
                for label, triton_on, moe, linear, norm in variants:
                    kernels = dataclasses.replace(base, triton=triton_on, moe=moe, linear=linear, norm=norm)
                    torch.cuda.reset_peak_memory_stats(0)
                    rt = Runtime(model, max_len=args.context, device="cuda:0", graphs=True,
                                 decode_experts="grouped_mm", batch=b, kernels=kernels)
                    with torch.inference_mode():
                        rate = decode_rate(rt, b, args.tokens, args.repeats)
                        if args.profile and not label and b > 1:
                            extra[f"profile_1gpu_b{b}"] = step_profile(rt, b)
                            log(json.dumps({f"profile_1gpu_b{b}": extra[f"profile_1gpu_b{b}"]}))
                        if args.worst_prefill and not label:
                            worst_prefill(rt, b, args.context)
                        note = ""
                        if b == 1:
                            rt.reset()
                            greedy = list(rt.generate(probe[0].tolist(), 16, SampleParams(), set()))
                            rt.reset()
                            tok = int(rt.prefill(probe[0].tolist()).argmax())
                            step_logits[label] = rt.decode(tok)[0].float().cpu()
                            note = f"greedy tokens equal to HF: {sum(a == c for a, c in zip(greedy, hf_greedy))}/16"
                    rows.append({"config": "1 GPU, qwenhw fast path" + label, "batch": b, "tok_s": rate,
                                 "gpu_gib": [peak_gib(0, nontorch)], "note": note,
                                 "moe_block": block if moe else None})
                    log(json.dumps(rows[-1]))
                    del rt
                    gc.collect()
                    torch.cuda.empty_cache()
        for label in (", cuBLAS projections", ", torch norms", ", cuBLAS projections, torch norms"):
            if label not in step_logits:
                continue  # each A/B row's first decode step against the default row's
            a, r = step_logits[""], step_logits[label]
            extra[f"decode_logits_rel_err_new_vs{label.replace(',', '').replace(' ', '_')}"] = float(
                (a - r).norm() / r.norm())
        r = step_logits.get(", unfused (torch ops)")
        for label, a in step_logits.items():
            if r is not None and label != ", unfused (torch ops)":
                extra[f"decode_logits_rel_err_vs_unfused{label}"] = float((a - r).norm() / r.norm())
        log(json.dumps({k: v for k, v in extra.items() if k.startswith("decode_logits")}))
        if args.long_prefill:
            extra["long_prefill"] = long_prefill_check(model, kernels=base)
            log(json.dumps({"long_prefill": extra["long_prefill"]}))
        try:
            census = kernel_census(model, args.context, kernels=base)
            log(json.dumps({"kernel_census": census}))
        except Exception as exc:
            census = {"error": f"{type(exc).__name__}: {exc}"}
        if world > 1 and not args.fused_only:
            from accelerate import dispatch_model
            from accelerate.hooks import remove_hook_from_module

            set_experts(model, "grouped_mm")
            per = args.layers // world
            dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": world - 1, "lm_head": world - 1}
            dmap.update({f"model.layers.{i}": min(i // per, world - 1) for i in range(args.layers)})
            dispatch_model(model, dmap)
            for b in batches:
                for d in range(world):
                    torch.cuda.reset_peak_memory_stats(d)
                ids = torch.randint(0, 151936, (b, 32), generator=g).cuda()
                with torch.inference_mode():
                    def run(n):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                        torch.cuda.synchronize()
                        return time.perf_counter() - t
                    run(2)
                    t1, tn = run(1), run(args.accelerate_tokens)
                rate = b * (args.accelerate_tokens - 1) / (tn - t1)
                rows.append({"config": f"accelerate layer split over {world} GPUs", "batch": b, "tok_s": rate,
                             "gpu_gib": [peak_gib(d, nontorch) for d in range(world)]})
                log(json.dumps(rows[-1]))
            remove_hook_from_module(model, recurse=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    dist.barrier()

    # --- qwenhw: tensor-parallel attention + MoE (whole experts per GPU, or every expert split), one rank per GPU
    modes = [m for m in args.experts.split(",") if m]
    tp_step, tp_batch = {}, {}
    traces_all = {}
    for mode in modes if world > 1 else []:
        if big:
            model = build_sharded(config_235b(args.layers), rank, world, f"cuda:{rank}", mode)
        else:
            model = build(args.layers, f"cuda:{rank}")  # same seed on every rank: identical weights
            shard(model, rank, world, mode)
        gc.collect()
        torch.cuda.empty_cache()
        trace = [memory_point(f"experts {mode}: after build + shard", rank, model)]
        # the first mode also runs "apart" (the symmetric-memory reduction and the next RMSNorm as two
        # kernels, KernelConfig.fused_reduce off) and, with --nccl, the same layout on NCCL all-reduces (symm "0")
        runs = [(b, "1", "") for b in batches]
        if not big and mode == modes[0]:
            runs += [(b, "1", "apart") for b in batches] + ([(b, "0", "") for b in batches] if args.nccl else [])
        if args.pull_too:  # the one-shot reduce + norm kernel (barrier, then reads across the links)
            runs += [(b, "1", "pull") for b in batches]
        if args.linear_too:  # the projections on cuBLAS, as before the Triton decode GEMMs
            runs += [(b, "1", "cublas") for b in batches]
        layout = f"qwenhw TP={world} attention + {EXPERT_MODES[mode].format(n=world)}"
        for b, symm, apart in runs:
            kernels = dataclasses.replace(base, symm_mem=symm == "1", linear=apart != "cublas",
                                          fused_reduce=base.fused_reduce and apart != "apart",
                                          push_reduce=base.push_reduce and apart != "pull")
            with use_block(f"{mode}{world}", b) as block:
                torch.cuda.reset_peak_memory_stats(rank)
                path = None
                for graphs in (True, False):
                    try:
                        rt = Runtime(model, max_len=args.context, device=f"cuda:{rank}", graphs=graphs,
                                     decode_experts="grouped_mm", batch=b, group=dist.group.WORLD, kernels=kernels)
                        path = rt.reducer.path
                        trace.append(memory_point(f"experts {mode}, batch {b}, symm {symm}: runtime built", rank))
                        with torch.inference_mode():
                            rate = decode_rate(rt, b, args.tokens, args.repeats)
                            if args.profile and b > 1 and not apart and symm == "1":
                                prof = step_profile(rt, b)  # every rank replays (collectives); rank 0's kept
                                if rank == 0:
                                    extra[f"profile_tp{world}_{mode}_b{b}"] = prof
                                    log(json.dumps({f"profile_tp{world}_{mode}_b{b}": prof}))
                            if args.worst_prefill and not apart and symm == "1":
                                worst_prefill(rt, b, args.context)
                            err = None
                            if b > 1 and not big and not args.only_tp and symm == "1":  # the probe in every row
                                rt.reset()
                                logits = rt.prefill([probe[0].tolist()] * b)
                                tp_batch[(mode, apart)] = rt.decode(logits.argmax(-1)).float().cpu()
                            if b == 1 and not big and not args.only_tp and symm == "1":  # every rank runs it
                                rt.reset()
                                logits = rt.prefill(probe[0].tolist())[0]
                                tp_step[(mode, apart)] = rt.decode(int(logits.argmax()))[0].float().cpu()
                                logits = logits.float().cpu()
                                err = float((logits - ref).norm() / ref.norm()) if rank == 0 else None
                        break
                    except Exception as exc:  # graph capture of NCCL collectives can fail: measure eagerly then
                        log(f"rank {rank}: graphs={graphs} failed: {type(exc).__name__}: {exc}")
                        rate, err = float("nan"), None
            trace.append(memory_point(f"experts {mode}, batch {b}, symm {symm}: after decoding", rank))
            mem = torch.tensor([peak_gib(rank, nontorch)], device="cuda")
            mems = [torch.zeros_like(mem) for _ in range(world)]
            dist.all_gather(mems, mem)
            if rank == 0:
                rows.append({"config": layout + ("" if graphs else " (no CUDA graphs)")
                             + ("" if symm == "1" else ", NCCL") + {"": "", "apart": ", reduce and norm apart",
                                                                     "pull": ", reduce pulling",
                                                                     "cublas": ", cuBLAS projections"}[apart],
                             "batch": b, "tok_s": rate, "gpu_gib": [float(m) for m in mems], "logit_rel_err": err,
                             "reduce": path, "experts": mode, "moe_block": block})
                log(json.dumps(rows[-1]))
            del rt
            gc.collect()
            torch.cuda.empty_cache()
        traces_all[mode] = trace
        del model  # before the next layout builds its own
        gc.collect()
        torch.cuda.empty_cache()
    first = modes[0] if modes else None
    if (first, "") in tp_step:  # each TP row's first decode step against the first mode's default row
        r = tp_step[(first, "")]
        for (mode, variant), a in tp_step.items():
            if (mode, variant) != (first, ""):
                key = f"tp_decode_logits_rel_err_{mode}{'_' + variant if variant else ''}_vs_{first}"
                extra[key] = float((a - r).norm() / r.norm())
    for (mode, variant), a in tp_batch.items():  # a batch of one prompt: every row as the batch-1 step
        name = f"{mode}{'_' + variant if variant else ''}"
        if (mode, variant) in tp_step:
            one = tp_step[(mode, variant)]
            extra[f"tp_batch_rows_rel_err_vs_batch1_{name}"] = max(float((row - one).norm() / one.norm()) for row in a)
        if (first, "") in tp_batch and (mode, variant) != (first, ""):
            r = tp_batch[(first, "")]
            extra[f"tp_batch_logits_rel_err_{name}_vs_{first}"] = float((a - r).norm() / r.norm())
    log(json.dumps({k: v for k, v in extra.items() if k.startswith("tp_decode")}))
    if traces_all:
        traces = [None] * world
        dist.all_gather_object(traces, {"nontorch_gib": nontorch / GiB, "points": traces_all})
        extra["tp_memory_trace"] = traces
        if rank == 0:
            for r, t in enumerate(traces):
                log(f"rank {r} memory (GiB; torch context and NCCL outside: {t['nontorch_gib']:.2f} at start)")
                for mode, points in t["points"].items():
                    for point in points:
                        log("  " + json.dumps(point))

    # --- qwenhw data parallel: world // tp replicas of tp GPUs, each decoding batch // replicas -------------
    tps = [1] + ([2] if world >= 4 else [])
    dp_mode = modes[0] if modes else "ep"  # DP x TP replicas split their experts as the first --experts mode
    for tp in tps if world > 1 and not big and not args.only_tp else []:
        replicas = world // tp
        group = replica_group(tp) if tp > 1 else None
        model = build(args.layers, f"cuda:{rank}")
        if tp > 1:
            shard(model, rank % tp, tp, dp_mode)
        gc.collect()
        torch.cuda.empty_cache()
        for b in batches:
            if b < replicas:
                continue  # fewer sequences than replicas: the planner keeps the smaller layout
            torch.cuda.reset_peak_memory_stats(rank)
            with use_block("1" if tp == 1 else f"{dp_mode}{tp}", b // replicas) as block:
                rt = Runtime(model, max_len=args.context, device=f"cuda:{rank}", graphs=True,
                             decode_experts="grouped_mm", batch=b // replicas, group=group, kernels=base)
                with torch.inference_mode():
                    rate = decode_rate(rt, b // replicas, args.tokens, args.repeats, barrier=dist.barrier)
            stats = torch.tensor([rate if rank % tp == 0 else 0.0, peak_gib(rank, nontorch)], device="cuda")
            every = [torch.zeros_like(stats) for _ in range(world)]
            dist.all_gather(every, stats)
            if rank == 0:
                split = EXPERT_MODES[dp_mode].format(n=tp)
                label = (f"qwenhw DP={replicas} (whole model per GPU)" if tp == 1
                         else f"qwenhw DP={replicas} x (TP={tp} attention + {split})")
                rows.append({"config": label, "batch": b, "tok_s": float(sum(e[0] for e in every)),
                             "gpu_gib": [float(e[1]) for e in every], "tp": tp, "n": world, "moe_block": block,
                             "experts": dp_mode if tp > 1 else None})
                log(json.dumps(rows[-1]))
            del rt
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        dist.barrier()

    if rank == 0:
        import qwenhw
        import qwenhw.plugins
        import qwenhw_native

        if "native" not in qwenhw.plugins.load().backends:  # run from a checkout: register it in-process
            qwenhw.plugins.register_plugin(qwenhw_native, "qwenhw-native")
        hw = qwenhw.detect()
        plan_notes = []
        try:
            from qwenhw.api import make_request
            from qwenhw_native import planner

            name = "Qwen3-235B-A22B" if big else "Qwen3-30B-A3B"
            spec = qwenhw.models.get(name).with_(num_layers=args.layers)
            for r in rows:
                req = make_request(context=args.context, concurrency=r["batch"])
                if r["config"].startswith("1 GPU"):
                    plan = planner.one_gpu_plan(spec, hw, req, "auto", args.context, "bf16")
                elif r["config"].startswith("qwenhw"):
                    plan = planner.parallel_plan(spec, hw, req, "auto", args.context, "bf16", world, r.get("tp", world),
                                                 r.get("experts"))
                else:
                    plan = None
                if plan is not None:
                    r["pred_gpu_gib"] = plan.devices[0].total_gib
                    r["pred_tok_s"] = plan.estimate.throughput_tok_s
                chosen = qwenhw.plan(spec, hw, backend="native", context=args.context, concurrency=r["batch"])
                r["planner_choice"] = f"{chosen.engine} {chosen.parallel}"
            plan_notes = [chosen.explain()]
        except Exception as exc:
            plan_notes = [f"planner: {type(exc).__name__}: {exc}"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"multi_gpu_{args.model}_{world}.json").write_text(json.dumps(
            {"rows": rows, "plan": plan_notes, "kernel_census": census, **extra}, indent=2))
        base = {r["batch"]: r["tok_s"] for r in rows if r["config"] == "1 GPU, qwenhw fast path"}
        log(f"{'configuration':<52} {'batch':>5} {'tok/s':>8} {'vs 1 GPU':>8}  per-GPU peak GiB")
        for r in rows:
            ratio = r["tok_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
            log(f"{r['config']:<52} {r['batch']:>5} {r['tok_s']:8.1f} {ratio:7.2f}x  "
                + " ".join(f"{m:.1f}" for m in r["gpu_gib"]) + (f"  (pred {r['pred_gpu_gib']:.1f})" if "pred_gpu_gib" in r else "")
                + (f"  pred {r['pred_tok_s']:.0f} tok/s" if "pred_tok_s" in r else "")
                + (f"  logit err {r['logit_rel_err']:.1e}" if r.get("logit_rel_err") is not None else "")
                + (f"  {r['note']}" if r.get("note") else "") + (f"  [{r['reduce']}]" if r.get("reduce") else ""))
        for b in batches:
            choice = next(r["planner_choice"] for r in rows if r["batch"] == b)
            log(f"planner's choice at batch {b}: {choice}")
        for note in plan_notes:
            log(note)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
