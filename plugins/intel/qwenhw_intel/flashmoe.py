"""FlashMoE: ipex-llm's llama.cpp build for GGUF MoE models on Arc cards. Pure planning and command lines.

FlashMoE keeps the routed experts in host RAM (computed by the CPU) and the attention, norms, router and
LM head on the card(s), layers split across cards. ipex-llm's quickstart asks for 128 GB of RAM for
Qwen3-235B-A22B int4 and 1-8 A770/B580 cards, and advises `-c 1024` on a single A770; maintainers advise
`--no-mmap` (experts resident instead of paged, faster) and `numactl --interleave=all` on two sockets.
"""

from __future__ import annotations

import math

from qwenhw.hardware.profile import GiB, HardwareProfile
from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec
from qwenhw.planning.layout import experts_touched
from qwenhw.planning.footprint import RAM_HEADROOM, usable_ram
from qwenhw.planning.plan import DeviceUse, Estimate, Offload, Parallel, Plan, Request

from .formats import GGUF_BPW, GGUF_LADDER, REQUEST_TO_GGUF, Bytes, gguf_bytes

CARD_UTILISATION = 0.95
COMPUTE_BUFFER = 2.0 * GiB  # per card; the quickstart's log shows 2076 MiB per SYCL device
HOST_BUFFER = 1.3 * GiB  # SYCL_Host compute buffer (1332 MiB in the same log)
BW_EFF = 0.7  # llama.cpp reaches most of the bandwidth on both sides
HOP_S = 20e-6  # hidden state crossing PCIe, twice per MoE layer
UBATCH = 512  # llama.cpp's default micro-batch: prefill moves experts to the cards per micro-batch


def plan(spec: ModelSpec, hw: HardwareProfile, req: Request, context: int, quant: str | None = None) -> Plan:
    node = hw.node
    gpus = node.gpus("intel")
    ram = req.cpu_memory_gib * GiB if req.cpu_memory_gib is not None else \
        usable_ram(node)
    cap = gpus[0].memory_bytes * CARD_UTILISATION if req.gpu_memory_gib is None else req.gpu_memory_gib * GiB
    n = len(gpus)
    ctx_total = context * req.concurrency  # llama-server splits -c over its -np slots
    if req.dtype == "fp8":
        return _plan(spec, hw, req, context, "Q8_0", n, ram, cap, ("llama.cpp has no fp8 GGUF; --dtype int8 gives Q8_0",))
    if quant:
        chosen = quant
    elif req.dtype not in (None, "auto"):
        chosen = REQUEST_TO_GGUF.get(req.dtype, "Q4_K_M")
    else:  # the best quality whose experts fit in RAM and whose rest fits the cards
        chosen = next((q for q in GGUF_LADDER if host_need(spec, gguf_bytes(spec, q)) <= ram
                       and card_need(spec, gguf_bytes(spec, q), n, ctx_total) <= cap), GGUF_LADDER[-1])
    return _plan(spec, hw, req, context, chosen, n, ram, cap, ())


def host_need(spec: ModelSpec, w: Bytes) -> float:
    """Host RAM: every routed expert (resident with --no-mmap), the token embedding and llama.cpp's host buffer."""
    return w.experts + w.embed + HOST_BUFFER


def card_need(spec: ModelSpec, w: Bytes, cards: int, ctx_total: int) -> float:
    """The fullest card: its share of the layers' non-expert weights, the LM head (last card), f16 KV, buffers."""
    kv = mm.kv_bytes_per_token(spec, "fp16") * ctx_total
    return (w.non_expert + kv) / cards + w.head + COMPUTE_BUFFER


def context_per_cards(spec: ModelSpec, w: Bytes, cap: float, cards: int) -> int:
    """Largest -c (multiple of 1024) that fits `cards` cards of `cap` bytes."""
    room = (cap - w.head - COMPUTE_BUFFER) * cards - w.non_expert
    per_token = mm.kv_bytes_per_token(spec, "fp16")
    tokens = int(room / per_token) if room > 0 else 0
    return min(spec.max_position, tokens // 1024 * 1024)


def _plan(spec: ModelSpec, hw: HardwareProfile, req: Request, context: int, quant: str, n: int, ram: float,
          cap: float, problems: tuple[str, ...]) -> Plan:
    node = hw.node
    gpus = node.gpus("intel")
    w = gguf_bytes(spec, quant)
    ctx_total = context * req.concurrency
    host = host_need(spec, w)
    card = card_need(spec, w, n, ctx_total)
    kv = mm.kv_bytes_per_token(spec, "fp16") * ctx_total / n
    file_size = w.total
    reasons = list(problems)
    if host > ram:
        # what RAM would make it fit, at this quant and at Q4_K_M for reference
        need = math.ceil(host / RAM_HEADROOM / GiB / 16) * 16
        smaller = next((q for q in GGUF_LADDER if host_need(spec, gguf_bytes(spec, q)) <= ram), None)
        reasons.append(
            f"FlashMoE keeps the routed experts in host RAM: {quant} experts need {host / GiB:.1f} GiB "
            f"({w.experts / GiB:.1f} experts + embedding + host buffer), the RAM budget is {ram / GiB:.1f} GiB of "
            f"{node.cpu.ram_bytes / GiB:.0f} GiB; a machine with {need} GiB of RAM runs it"
            + (f", or {smaller} fits this one" if smaller and smaller != quant else "")
            + (f" (Q4_K_M, the int4 of ipex-llm's 128 GB guidance for Qwen3MoE 235B, needs "
               f"{host_need(spec, gguf_bytes(spec, 'Q4_K_M')) / GiB:.1f} GiB)" if quant != "Q4_K_M" else "")
            + "; llama.cpp's default mmap would still start and page experts from disk, far slower")
    if card > cap:
        reasons.append(f"the {n} card(s) need {card / GiB:.1f} GiB each (attention weights, f16 KV for -c {ctx_total}, "
                       f"{COMPUTE_BUFFER / GiB:.1f} GiB compute buffer); {gpus[0].name} offers {cap / GiB:.1f} GiB: "
                       f"lower --context (fits -c {context_per_cards(spec, w, cap, n)})")
    if file_size > node.disk.free_bytes:
        reasons.append(f"the {quant} GGUF is {file_size / GiB:.1f} GiB; {node.disk.path} has "
                       f"{node.disk.free_bytes / GiB:.0f} GiB free")
    fits = not reasons
    if fits:
        reasons.append(
            f"FlashMoE (ipex-llm llama.cpp, GGUF {quant}, {GGUF_BPW[quant]:.2f} bits/weight, file {file_size / GiB:.1f} GiB): "
            f"{w.experts / GiB:.1f} GiB of routed experts in host RAM computed by {node.cpu.physical_cores} cores, "
            f"attention on {n} x {gpus[0].name} ({card / GiB:.1f} GiB each); needs the GGUF file, not the HF checkpoint")
    est = estimate(spec, w, hw, req.concurrency, n) if fits else Estimate()
    devices = tuple(DeviceUse(g.device_id, "intel-gpu", cap / GiB, (w.non_expert / n + (w.head if i == n - 1 else 0)) / GiB,
                              kv / GiB, COMPUTE_BUFFER / GiB) for i, g in enumerate(gpus[:n]))
    devices += (DeviceUse("cpu", "cpu", ram / GiB, (w.experts + w.embed) / GiB, 0.0, HOST_BUFFER / GiB),)
    return Plan(
        model=spec.name, backend="intel", engine="flashmoe", fits=fits, parallel=Parallel(pp=n), devices=devices,
        offload=Offload(cpu_gib=w.experts / GiB, experts_on_cpu=True), context=context,
        max_context=context_per_cards(spec, w, cap, n) // max(req.concurrency, 1), concurrency=req.concurrency,
        dtype=f"gguf-{quant.lower()}", kv_dtype="fp16", estimate=est, reasons=tuple(reasons),
        config={"gguf_quant": quant, "gguf_gib": round(file_size / GiB, 2), "cards": n, "ctx": ctx_total,
                "np": req.concurrency, "threads": node.cpu.physical_cores, "sockets": node.cpu.sockets,
                "ctx_per_cards": {str(k): context_per_cards(spec, w, cap, k) for k in range(1, n + 1)},
                "host_gib": round(host / GiB, 2), "card_gib": round(card / GiB, 2)},
    )


def estimate(spec: ModelSpec, w: Bytes, hw: HardwareProfile, batch: int, cards: int) -> Estimate:
    node = hw.node
    gpu = node.gpus("intel")[0]
    experts = w.experts * experts_touched(spec, batch) / spec.moe.num_experts if spec.moe else 0.0
    t_cpu = experts / (max(node.cpu.memory_bandwidth_gbs, 1.0) * 1e9 * BW_EFF)
    t_gpu = (w.non_expert + w.head) / (gpu.bandwidth_gbs * 1e9 * BW_EFF)  # cards run their layers in turn
    t_hops = spec.num_moe_layers * 2 * HOP_S + (cards - 1) * HOP_S
    step = t_cpu + t_gpu + t_hops + spec.num_layers * 30e-6
    prefill = UBATCH / max(w.experts / (node.host_to_device_gbs * 1e9), 1e-6)  # experts cross PCIe per micro-batch
    bound = "host RAM bandwidth (CPU experts)" if t_cpu >= t_gpu else "XPU memory bandwidth"
    return Estimate(decode_tok_s=1 / step, throughput_tok_s=batch / step, prefill_tok_s=prefill, bound=bound,
                    basis=("FlashMoE (llama.cpp): a roofline, not measured",))
