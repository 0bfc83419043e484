"""The fused decode kernels (fused.py) run through Triton's interpreter on the CPU: the same kernel code the
GPU compiles, checked against transformers' Qwen3 modules. The interpreter rounds to bf16 differently from
the GPU, so exactness is checked in fp32 and bf16 only within its rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]

KERNELS = r'''
import json, sys, torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeConfig, Qwen3MoeRMSNorm,
                                                              Qwen3MoeTopKRouter, apply_rotary_pos_emb)
from qwenhw_offload import fused
out = {}
for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    b, t, hq, hk, d, L, p = 2, 1, 8, 2, 64, 16, 5
    qn, kn = Qwen3MoeRMSNorm(d).to(dt), Qwen3MoeRMSNorm(d).to(dt)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g)); kn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        q, k, v = (torch.randn(b, t, n * d, generator=g).to(dt).view(b, t, n, d) for n in (hq, hk, hk))
        ang = torch.randn(1, t, d // 2, generator=g)
        cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dt) for f in (torch.cos, torch.sin))
        kc = torch.full((b, hk, L, d), float("nan"), dtype=dt); vc = kc.clone()
        qr, kr = apply_rotary_pos_emb(qn(q).transpose(1, 2), kn(k).transpose(1, 2), cos, sin)
        qo = fused.qk_rope_cache(q, k, v, qn, kn, cos, sin, torch.tensor([p]), kc, vc)
        rel = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())
        cfg = Qwen3MoeConfig(hidden_size=32, num_experts=60, num_experts_per_tok=6, norm_topk_prob=True)
        router = Qwen3MoeTopKRouter(cfg).to(dt)
        router.weight.copy_(torch.randn(60, 32, generator=g))
        logits, w_ref, i_ref = router(torch.randn(7, 32, generator=g).to(dt))
        w, i = fused.route(logits, 6, True)
        cfg = Qwen3MoeConfig(hidden_size=128, num_experts=60, num_experts_per_tok=6, norm_topk_prob=True)
        big = Qwen3MoeTopKRouter(cfg).to(dt)  # decode-sized calls: the router GEMM in the kernel too
        big.weight.copy_(torch.randn(60, 128, generator=g))
        x2 = torch.randn(5, 128, generator=g).to(dt)
        _, w2_ref, i2_ref = big(x2)
        w2, i2 = fused.gate_route(big, x2)
        w3, i3 = fused.gate_route(big, x2)  # the counter was left at zero: the same again
        # one GPU: the router kernel applies the post-attention RMSNorm itself and writes the normalised rows
        pn = Qwen3MoeRMSNorm(128).to(dt)
        pn.weight.copy_(1 + 0.2 * torch.randn(128, generator=g))
        hn = 3 * torch.randn(5, 128, generator=g).to(dt)
        xn_ref = F.rms_norm(hn.float(), (128,), pn.weight.float(), pn.variance_epsilon)
        xn = torch.full_like(hn, float("nan"))
        sq = hn.float().pow(2).view(5, 4, 32).sum(-1)  # the sums of squares o_proj leaves, in 4 parts
        w4, i4 = fused.router(hn, big.weight, 6, True, norm=(pn.weight, pn.variance_epsilon, sq), xn=xn)
        _, w4_ref, i4_ref = big(xn_ref.to(dt))
    out[name + " router"] = {"ids": torch.equal(i2.sort(-1).values, i2_ref.sort(-1).values), "w": rel(w2, w2_ref),
                             "again": torch.equal(i3, i2) and torch.equal(w3, w2),
                             "counter": int(fused._COUNTS[(x2.device, "router")].abs().sum()),
                             "normed_x": rel(xn, xn_ref), "normed_ids": torch.equal(i4.sort(-1).values,
                                                                                   i4_ref.sort(-1).values),
                             "normed_w": rel(w4, w4_ref)}
    out[name] = {"q": rel(qo, qr), "k": rel(kc[:, :, p:p + 1], kr), "v_exact": torch.equal(vc[:, :, p], v[:, 0]),
                 "untouched_nan": bool(kc[:, :, :p].isnan().all()), "route_ids": torch.equal(i.sort(-1).values, i_ref.sort(-1).values),  # ties may swap order
                 "route_w": rel(w, w_ref)}
print(json.dumps(out))
'''

MOE = r'''
import json, torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts
from qwenhw_offload import fused
out = {}
rel = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())


def random_experts(n, inter, g, dt):
    cfg = Qwen3MoeConfig(hidden_size=48, moe_intermediate_size=inter, num_experts=n, num_experts_per_tok=3)
    cfg._experts_implementation = "eager"
    ex = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    return cfg, ex.to(dt)


for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    cfg, ex = random_experts(8, 40, g, dt)
    t = 20  # 60 pairs; every token picks expert 0, so it gets more than one 16-row block
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(7, generator=g)[:2]])
                       for _ in range(t)])
    idx[3] = torch.tensor([5, 6, 7])  # no pair on the rank holding experts 0..3
    x = torch.randn(t, 48, generator=g).to(dt)
    w = torch.rand(t, 3, generator=g).to(dt)
    _, many = random_experts(130, 16, g, dt)
    many_idx = torch.stack([torch.randperm(130, generator=g)[:3] for _ in range(t)])
    with torch.no_grad():
        ref = ex(x, idx, w)
        got = fused.moe_experts(x, ex, idx, w)
        upper = Qwen3MoeExperts(cfg).to(dt)  # an expert-parallel rank holding experts 4..7
        upper.gate_up_proj.data, upper.down_proj.data = ex.gate_up_proj.data[4:].clone(), ex.down_proj.data[4:].clone()
        part = fused.moe_experts(x, upper, idx, w, ep_start=4)
        mine = idx >= 4
        ref_part = ex(x, torch.where(mine, idx, torch.full_like(idx, 8)), w * mine.to(dt))
        rest = fused.moe_experts(x, ex, torch.where(mine, torch.full_like(idx, 99), idx), w)  # ids 99: not here
        top1 = fused.moe_experts(x, ex, idx[:, :1], w[:, :1])
        ref_top1 = ex(x, idx[:, :1], w[:, :1])
        h = torch.randn(t, 48, generator=g).to(dt)
        into = torch.full((t, 48), float("nan"), dtype=dt)
        with_res = fused.moe_experts(x, ex, idx, w, residual=h, out=into)
        nw = (1 + 0.2 * torch.randn(48, generator=g)).to(dt)
        xn = torch.full((t, 48), float("nan"), dtype=dt)
        normed_sum = fused.moe_experts(x, ex, idx, w, residual=h, norm=(nw, 1e-6, xn))  # one GPU: + next RMSNorm
        xn_ref = F.rms_norm(normed_sum.float(), (48,), nw.float(), 1e-6)
        # the gate/up kernel in 3 slices of the hidden size, the last slice to finish applying the activation;
        # the down kernel on tiles of its own
        split = fused.moe_experts(x, ex, idx, w, block=(16, 16, 4, 1, 3), down_block=(32, 16, 4, 1))
        split_ep = fused.moe_experts(x, upper, idx, w, ep_start=4, block=(16, 16, 4, 1, 3))
        counts = fused._COUNTS[(x.device, "moe")]
        # every rank holds every expert and the touched ones are dealt out in id order: 3 ranks here, and 130
        # experts over 2 ranks (the touched set spans three 64-bit words)
        dealt = {}
        for experts, ids, ranks in ((ex, idx, 3), (many, many_idx, 2)):
            order = {e: i for i, e in enumerate(sorted(set(ids.flatten().tolist())))}
            owner = torch.tensor([[order[e] % ranks for e in row] for row in ids.tolist()])
            n = experts.gate_up_proj.shape[0]
            parts = [fused.moe_experts(x, experts, ids, w, share=(r, ranks)) for r in range(ranks)]
            refs = [experts(x, torch.where(owner == r, ids, torch.full_like(ids, n)), w * (owner == r).to(dt))
                    for r in range(ranks)]
            dealt[n] = [max(rel(a, b) for a, b in zip(parts, refs)), rel(sum(parts), experts(x, ids, w))]
    out[name] = {"split": rel(split, ref), "split_ep": rel(split_ep, ref_part), "dealt": dealt,
                 "counts_back_to_zero": int(counts.count_nonzero()) == 0 and counts.numel() >= 8 * 3,
                 "full": rel(got, ref), "ep": rel(part, ref_part), "ep_sum": rel(part + rest, ref),
                 "top1": rel(top1, ref_top1), "supported": fused.moe_supported(ex),
                 "no_pair_row_zero": bool((rest[3] == 0).all()), "residual": rel(with_res, h + ref),
                 "normed_sum": rel(normed_sum, with_res), "next_norm": rel(xn, xn_ref),
                 "wrote_into_out": with_res is into and not bool(into.isnan().any())}
print(json.dumps(out))
'''

ATTENTION = r'''
import json, torch
import torch.nn.functional as F
from qwenhw_offload import fused
out = {}
for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    b, hq, hk, d, L = 2, 8, 2, 64, 600  # 3 splits of 256 positions
    res = {}
    for pos in (0, 37, 255, 256, 599):
        q = torch.randn(b, hq, 1, d, generator=g).to(dt)
        kc, vc = (torch.randn(b, hk, L, d, generator=g).to(dt) for _ in range(2))
        kc[:, :, pos + 1:] = float("nan")  # past the current position: must never be read
        vc[:, :, pos + 1:] = float("nan")
        mask = torch.zeros(1, 1, 1, L, dtype=dt)
        mask[..., pos + 1:] = float("-inf")
        ref = F.scaled_dot_product_attention(q, kc.nan_to_num(), vc.nan_to_num(), attn_mask=mask, scale=0.125,
                                             enable_gqa=True).transpose(1, 2).reshape(b, 1, -1)
        got = fused.decode_attention(q, kc, vc, torch.tensor([pos]), 0.125)
        res[str(pos)] = float((got.float() - ref.float()).norm() / ref.float().norm())
        if pos >= 256:  # left padding: sequence 1 starts at slot 300 (or pos), its earlier slots are NaN
            first = min(300, pos)
            kc[1, :, :first] = float("nan")
            vc[1, :, :first] = float("nan")
            mask1 = mask.clone()
            mask1[..., :first] = float("-inf")
            ref1 = F.scaled_dot_product_attention(q[1:], kc[1:].nan_to_num(), vc[1:].nan_to_num(), attn_mask=mask1,
                                                  scale=0.125, enable_gqa=True).transpose(1, 2).reshape(1, 1, -1)
            got1 = fused.decode_attention(q, kc, vc, torch.tensor([pos]), 0.125, torch.tensor([0, first]))[1:]
            res[f"{pos}-start"] = float((got1.float() - ref1.float()).norm() / ref1.float().norm())
    out[name] = res
print(json.dumps(out))
'''

RUNTIME = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
from qwenhw_offload import fused
from qwenhw_offload.runtime import Runtime, SampleParams
calls = []
moe_experts, decode_attention = fused.moe_experts, fused.decode_attention
qkv_rope, linear_residual = fused.qkv_rope, fused.linear_residual
fused.moe_experts = lambda *a, **k: calls.append("moe") or moe_experts(*a, **k)
fused.decode_attention = lambda *a, **k: calls.append("attention") or decode_attention(*a, **k)
fused.qkv_rope = lambda *a, **k: calls.append("qkv") or qkv_rope(*a, **k)
fused.linear_residual = lambda *a, **k: calls.append("o_proj") or linear_residual(*a, **k)
router = fused.router
fused.router = lambda *a, **k: calls.append("router_norm" if k.get("norm") else "router") or router(*a, **k)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompt = [785, 6722, 315, 9625, 374, 264]
rt = Runtime(model, 64, "cpu", graphs=False)
assert rt.fused
tokens = list(rt.generate(prompt, 8, SampleParams(), set()))
with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
counts = {name + "_calls": calls.count(name) for name in ("moe", "attention", "qkv", "o_proj", "router_norm")}
short = list(rt.generate(prompt[2:], 8, SampleParams(), set()))
pair = Runtime(model, 64, "cpu", graphs=False, batch=2).generate_batch([prompt, prompt[2:]], 8, SampleParams(), set())
print(json.dumps({"fused": tokens, "hf": ref, **counts, "batch": pair, "alone": [tokens, short]}))
'''

REDUCE_NORM = r'''
import json, torch
from types import SimpleNamespace
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
from qwenhw_offload import fused
from qwenhw_offload.runtime import rms_norm
g = torch.Generator().manual_seed(0)
rows, hidden, world = 3, 96, 2
# rank 0 of two: two symmetric buffers (each two halves) and two signal pads, all in this process
bufs = [torch.randn(2 * rows * hidden, generator=g) for _ in range(world)]
line = fused.PAD_LINE  # each barrier slot's flags: rank r's at slot * line + r
pads = [torch.zeros(rows * line, dtype=torch.int32) for _ in range(world)]
for slot in range(rows):
    pads[0][slot * line + 1] = 1  # rank 1 has reached the barrier of every row already
buf_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
handle = SimpleNamespace(buffer_ptrs_dev=buf_ptrs.data_ptr(), signal_pad_ptrs_dev=pad_ptrs.data_ptr(), rank=0,
                         world_size=world)
norm = Qwen3MoeRMSNorm(hidden, eps=1e-6)
with torch.no_grad():
    norm.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=g))
h, x = torch.empty(rows, hidden), torch.empty(rows, hidden)
fused.reduce_norm(handle, rows * hidden, rows, hidden, norm.weight, 1e-6, h, x)  # the second half
ref = (bufs[0][rows * hidden:] + bufs[1][rows * hidden:]).view(rows, hidden)
sent = [int(pads[1][slot * line + 0]) for slot in range(rows)]
out = {"h": float((h - ref).abs().max()), "x": float((x - rms_norm(norm, ref)).abs().max()),
       "own_pad_cleared": int(pads[0].abs().sum()), "sent_to_peer": sent,
       "peer_pad_rest": int(pads[1].abs().sum()) - sum(sent)}
pads[1].zero_()
pads[0][0 * line + 1] = pads[0][1 * line + 1] = 1  # two rows per program: two barriers, the last half full
fused.reduce_norm(handle, 0, rows, hidden, norm.weight, 1e-6, h, x, per_program=2)  # the first half
ref = (bufs[0][: rows * hidden] + bufs[1][: rows * hidden]).view(rows, hidden)
out.update({"h2": float((h - ref).abs().max()), "x2": float((x - rms_norm(norm, ref)).abs().max()),
            "pads2": [int(pads[0].abs().sum()), int(pads[1].abs().sum())]})
print(json.dumps(out))
'''

REDUCE_PUSH = r'''
import json, torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
from qwenhw_offload import fused
from qwenhw_offload.runtime import rms_norm
out = {}
for name in ("float16", "bfloat16"):
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    rows, hidden, world, capacity, half = 3, 96, 2, 4, 1
    parts = [torch.randn(rows, hidden, generator=g).to(dt) for _ in range(world)]
    boxes = [torch.zeros(fused.push_words(capacity * hidden, world), dtype=torch.int64) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in boxes], dtype=torch.int64)
    norm = Qwen3MoeRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=g))
    norm = norm.to(dt)
    stride = capacity * hidden // 2
    wire = lambda t: (t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) | (1 << 32)  # two values + a flag
    at = lambda src: half * world * stride + src * stride
    slot = lambda rank, src: slice(at(src), at(src) + rows * hidden // 2)
    boxes[0][slot(0, 1)] = wire(parts[1]).view(-1)  # rank 1 has pushed already
    h0, x0, h1, x1 = (torch.empty(rows, hidden, dtype=dt) for _ in range(4))
    fused.reduce_norm_push(ptrs.data_ptr(), 0, world, half, capacity, parts[0], norm.weight, 1e-6, h0, x0)
    sent = bool(torch.equal(boxes[1][slot(1, 0)], wire(parts[0]).view(-1)))
    rest = int(boxes[0].count_nonzero()) + int(boxes[1].count_nonzero()) - rows * hidden // 2
    fused.reduce_norm_push(ptrs.data_ptr(), 1, world, half, capacity, parts[1], norm.weight, 1e-6, h1, x1,
                           per_program=2)  # reads what rank 0 pushed, two rows per program
    ref = (parts[0].float() + parts[1].float()).to(dt)
    out[name] = {"h_exact": bool(torch.equal(h0, ref)),
                 "h": float((h0.float() - ref.float()).norm() / ref.float().norm()),
                 "ranks_agree": bool(torch.equal(h0, h1) and torch.equal(x0, x1)),
                 "x": float((x0.float() - rms_norm(norm, ref).float()).norm() / rms_norm(norm, ref).float().norm()),
                 "sent": sent, "rest_after_first": rest, "read_cleared": int(boxes[1].count_nonzero()),
                 "pushed_back": bool(torch.equal(boxes[0][slot(0, 1)], wire(parts[1]).view(-1)))
                 and int(boxes[0].count_nonzero()) == rows * hidden // 2}
print(json.dumps(out))
'''


LINEAR = r"""
import doctest, json, torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
from qwenhw_offload import fused
out = {"doctests": doctest.testmod(fused).failed}
rel = lambda a, r: float((a.float() - r.float()).norm() / r.float().norm())
for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    g = torch.Generator().manual_seed(0)
    b, hidden, hq, hk, d, L, p = 3, 128, 4, 2, 64, 16, 5
    res = {}
    for norm, with_bias in ((True, False), (False, True)):  # Qwen3 (q/k norms), Qwen2 (a q/k/v bias)
        qn, kn = Qwen3MoeRMSNorm(d).to(dt), Qwen3MoeRMSNorm(d).to(dt)
        with torch.no_grad():
            qn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g)); kn.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        w = (torch.randn((hq + 2 * hk) * d, hidden, generator=g) * 0.1).to(dt)
        bias = torch.randn((hq + 2 * hk) * d, generator=g).to(dt) if with_bias else None
        x = torch.randn(b, hidden, generator=g).to(dt)
        ang = torch.randn(1, 1, d // 2, generator=g)
        cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dt) for f in (torch.cos, torch.sin))
        norms = (qn, kn) if norm else (None, None)
        kr, vr = (torch.full((b, hk, L, d), float("nan"), dtype=dt) for _ in range(2))
        q, k, v = F.linear(x, w, bias).view(b, 1, -1, d).split([hq, hk, hk], dim=2)
        qr = fused.qk_rope_cache(q, k, v, *norms, cos, sin, torch.tensor([p]), kr, vr)  # the cuBLAS path's kernel
        for split in (1, 4):  # one program per head, or four hidden slices each (the last adds them up)
            kc, vc = (torch.full((b, hk, L, d), float("nan"), dtype=dt) for _ in range(2))
            qo = fused.qkv_rope(x, w, bias, [hq, hk, hk], *norms, cos, sin, torch.tensor([p]), kc, vc, split=split)
            res[f"{'qwen3' if norm else 'qwen2'} split {split}"] = {
                "q": rel(qo, qr), "k": rel(kc[:, :, p], kr[:, :, p]), "v": rel(vc[:, :, p], vr[:, :, p]),
                "shape": list(qo.shape) == [b, hq, 1, d],
                "untouched_nan": bool(kc[:, :, :p].isnan().all() and vc[:, :, p + 1:].isnan().all())}
    # o_proj: into the hidden state in place (one GPU), into another buffer (a TP rank), or without residual
    x = torch.randn(b, 256, generator=g).to(dt)
    w = (torch.randn(100, 256, generator=g) * 0.1).to(dt)  # 100 columns: the last tile only partly stored
    h = torch.randn(b, 100, generator=g).to(dt)
    ref = torch.addmm(h, x, w.t())
    for split in (1, 2, 8):
        hh = h.clone()
        inplace = fused.linear_residual(x, w, residual=hh, out=hh, split=split)
        into = torch.full((b, 100), float("nan"), dtype=dt)
        plain = fused.linear_residual(x, w, out=into, split=split)
        _, sq = fused.linear_residual(x, w, residual=h, split=split, row_sq=True)  # + its rows' sums of squares
        res[f"o_proj split {split}"] = {"inplace": rel(inplace, ref), "same_tensor": inplace is hh,
                                        "plain": rel(plain, x @ w.t()), "wrote_into": plain is into,
                                        "row_sq": rel(sq.sum(1), inplace.float().pow(2).sum(1)),
                                        "row_sq_tiles": list(sq.shape) == [b, 7]}  # 100 columns, tiles of 16
    res["counters_zero"] = all(int(fused._COUNTS[(x.device, k)].count_nonzero()) == 0 for k in ("qkv", "linear"))
    out[name] = res
print(json.dumps(out))
"""


def _interpret(code: str, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "plugins" / "offload"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_kernels_follow_transformers():
    out = _interpret(KERNELS)
    fp32, bf16 = out["float32"], out["bfloat16"]
    assert fp32["q"] < 1e-5 and fp32["k"] < 1e-5 and fp32["route_w"] < 1e-5
    assert bf16["q"] < 3e-2 and bf16["k"] < 3e-2 and bf16["route_w"] < 1e-2
    for r in (fp32, bf16):
        assert r["v_exact"] and r["untouched_nan"] and r["route_ids"]
    # the router GEMM + routing kernel: the last of its programs routes, and leaves its counter at zero
    fp32, bf16 = out["float32 router"], out["bfloat16 router"]
    assert fp32["w"] < 1e-5 and bf16["w"] < 1e-2
    for r in (fp32, bf16):
        assert r["ids"] and r["again"] and r["counter"] == 0
    # with the RMSNorm in the router kernel: its normalised rows, and the routing of them
    assert fp32["normed_x"] < 1e-6 and bf16["normed_x"] < 1e-2 and fp32["normed_w"] < 1e-5
    assert fp32["normed_ids"]


def test_runtime_decodes_through_the_fused_kernels(tiny_moe):
    out = _interpret(RUNTIME, str(tiny_moe))
    assert out["fused"] == out["hf"]
    # both layers, every decode step (not the prompt), the projections on the decode GEMM kernels too
    # (and the router applying the post-attention RMSNorm, from the sums of squares o_proj left)
    assert out["moe_calls"] == out["attention_calls"] == out["qkv_calls"] == out["o_proj_calls"] == 2 * 7
    assert out["router_norm_calls"] == 2 * 7
    assert out["batch"] == out["alone"]  # two prompts of different lengths decoded together (left padding)


def test_decode_gemm_kernels_follow_cublas_and_the_rope_kernel():
    """The decode projections in Triton: q/k/v + q/k norms + RoPE + the cache write in one kernel against
    F.linear then qk_rope_cache (Qwen3 with norms, Qwen2 with a bias; one program per head or split-K with
    the last program adding up), and o_proj + residual against addmm, in place and into another buffer."""
    out = _interpret(LINEAR)
    assert out["doctests"] == 0
    for name, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        res = out[name]
        assert res.pop("counters_zero")  # each call leaves its split-K counters at zero for the next
        for case, r in res.items():
            errs = {k: v for k, v in r.items() if isinstance(v, float)}
            assert max(errs.values()) < tol, (name, case, errs)
            assert all(v for v in r.values() if isinstance(v, bool)), (name, case, r)

def test_fused_moe_kernels_follow_transformers_experts():
    out = _interpret(MOE)
    fp32, bf16 = out["float32"], out["bfloat16"]
    assert fp32["full"] < 1e-5 and fp32["ep"] < 1e-5 and fp32["ep_sum"] < 1e-5 and fp32["top1"] < 1e-5
    assert bf16["full"] < 3e-2 and bf16["ep"] < 3e-2 and bf16["ep_sum"] < 3e-2
    assert fp32["residual"] < 1e-5 and bf16["residual"] < 3e-2
    assert fp32["normed_sum"] == 0 and bf16["normed_sum"] == 0  # the same sum, with the next RMSNorm after it
    assert fp32["next_norm"] < 1e-6 and bf16["next_norm"] < 1e-2
    assert fp32["split"] < 1e-5 and fp32["split_ep"] < 1e-5 and bf16["split"] < 3e-2
    for n in ("8", "130"):  # dealt experts: each rank's share, and the shares' sum against all experts
        assert max(fp32["dealt"][n]) < 1e-5 and max(bf16["dealt"][n]) < 3e-2
    for r in (fp32, bf16):
        assert r["supported"] and r["no_pair_row_zero"] and r["wrote_into_out"] and r["counts_back_to_zero"]


def test_decode_attention_reads_the_filled_cache_only():
    """Split-KV decode attention against SDPA with the runtime's mask; positions past the current one hold
    NaN, so reading any of them would show."""
    out = _interpret(ATTENTION)
    assert max(out["float32"].values()) < 1e-5
    assert max(out["bfloat16"].values()) < 2e-2


def test_reduce_norm_sums_the_ranks_and_normalises():
    """The decode all-reduce + RMSNorm kernel as rank 0 of two, both ranks' buffers and signal pads in one
    process: it signals the peer once per row, takes the peer's flags back to zero, and sums the half it
    is pointed at. (The cross-GPU run is in bench/multi_gpu.py.)"""
    out = _interpret(REDUCE_NORM)
    assert out["h"] < 1e-6 and out["x"] < 1e-5
    assert out["own_pad_cleared"] == 0 and out["sent_to_peer"] == [1, 1, 1] and out["peer_pad_rest"] == 0
    assert out["h2"] < 1e-6 and out["x2"] < 1e-5 and out["pads2"] == [0, 2]


def test_reduce_norm_push_sums_what_the_peers_pushed():
    """The pushing all-reduce + RMSNorm as two ranks in one process, one after the other: rank 0 finds rank
    1's words in its memory (the wire format written here), pushes its own into rank 1's, and clears what it
    read; rank 1 then sums what rank 0 pushed. Both get the same bits: the sum rounded once."""
    out = _interpret(REDUCE_PUSH)
    assert out["float16"]["h_exact"] and out["bfloat16"]["h"] < 4e-3  # the interpreter's bf16 rounds its own way
    for r in out.values():
        assert r["ranks_agree"] and r["sent"] and r["x"] < 1e-2
        assert r["rest_after_first"] == 0 and r["read_cleared"] == 0  # each cleared what it read
        assert r["pushed_back"]  # rank 1's words wait in rank 0's memory for its next call


def _hopper_ptx(fn, sig: dict, consts: dict) -> str:
    """A kernel compiled for sm_90 ahead of time (PTX), its pointer arguments 16-byte aligned as a launch
    specialises them; skips where this Triton build has no ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget

    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, ty in sig.items() if ty.startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                    constexprs=consts, attrs=aligned)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    except RuntimeError as exc:  # no ptxas in this Triton build
        if "ptxas" in str(exc):
            pytest.skip(str(exc)[:200])
        raise


def test_reduce_norm_compiles_for_hopper():
    """The interpreter runs what a GPU compiler may reject (it let a plain module global through), and CI
    has no GPU: compile the kernel for sm_90 ahead of time, and check its flags are sys-scope atomics."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(ROOT / "plugins" / "offload"))
    from qwenhw_offload import fused

    sig = {"bufs_ptr": "i64", "pads_ptr": "i64", "offset": "i32", "h_ptr": "*bf16", "x_ptr": "*bf16",
           "w_ptr": "*bf16", "N": "i32", "H": "i32", "eps": "fp32"}
    for world, rows in ((2, 1), (4, 2), (3, 4)):
        consts = {"RANK": 1, "WORLD": world, "BW": triton.next_power_of_2(world), "LINE": fused.PAD_LINE,
                  "R": rows, "BH": 2048, "PDL": world != 3}
        src = triton.compiler.ASTSource(fn=fused._reduce_norm, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                        constexprs=consts)
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        except RuntimeError as exc:  # no ptxas in this Triton build
            if "ptxas" in str(exc):
                pytest.skip(str(exc)[:200])
            raise
        assert "atom.global.release.sys.cas.b32" in ptx and "atom.global.acquire.sys.cas.b32" in ptx
        assert ("griddepcontrol.wait" in ptx) == consts["PDL"]
    # the pushing kernel: its spin reads its own memory past L1 (volatile), and no atomics or barrier
    sig = {"part_ptr": "*bf16", "ll_ptr": "i64", "offset": "i32", "stride": "i32", "h_ptr": "*bf16", "x_ptr": "*bf16",
           "w_ptr": "*bf16", "N": "i32", "eps": "fp32"}
    for world, rows in ((2, 1), (4, 2)):
        consts = {"RANK": 1, "WORLD": world, "R": rows, "HW": 1024, "BW": 1024, "PDL": world == 2}
        src = triton.compiler.ASTSource(fn=fused._reduce_norm_push,
                                        signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert "ld.volatile.global" in ptx and "atom." not in ptx
        assert ("griddepcontrol.wait" in ptx) == consts["PDL"]


def test_moe_kernels_compile_for_hopper():
    """The MoE kernels for sm_90 ahead of time (see above), the split gate/up kernel included: weight loads
    pipelined (cp.async, given the 16-byte aligned pointers a launch specialises on), the split's count an
    acquire-release atomic and its partial sums read back from L2; the router GEMM + routing kernel alike."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(ROOT / "plugins" / "offload"))
    from qwenhw_offload import fused

    tiles = {"BP": 128, "BM": 16, "BN": 64, "BK": 128, "EXACT": False}
    kernels = [
        (fused._moe_gate_up, {"x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "h_ptr": "*bf16",
                              "part_ptr": "*fp32", "cnt_ptr": "*i32", "P": "i32", "ep_start": "i32", "E": "i32",
                              "rank": "i32"},
         [{"H": 2048, "I": inter, "TOP_K": 8, "SPLIT": split, "PDL": split == 2, "SHARES": 1 + (inter == 768),
           "NW": 2, **tiles} for inter in (768, 192) for split in (1, 2)]),
        (fused._moe_down, {"h_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i64", "rw_ptr": "*bf16", "y_ptr": "*bf16",
                           "P": "i32", "ep_start": "i32", "E": "i32", "rank": "i32"},
         [{"H": 2048, "I": inter, "PDL": pdl, "LINE": 64, "LINES": lines, "SHARES": 1 + pdl, "NW": 2, **tiles}
          for inter, lines in ((192, 4), (768, 16)) for pdl in (False, True)]),
        (fused._router, {"x_ptr": "*bf16", "g_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32", "w_ptr": "*bf16",
                         "idx_ptr": "*i64", "nw_ptr": "*bf16", "xn_ptr": "*bf16", "sq_ptr": "*fp32", "N": "i32",
                         "E": "i32", "SQ": "i32", "eps": "fp32"},
         [{"H": 2048, "K": 8, "BT": bt, "BE": 16, "BK": 128, "SPLIT": 4, "BLOCK_E": 128, "BLOCK_K": 8, "NORM": True,
           "PRENORM": prenorm, "BSQ": 64, "EXACT": False, "PDL": pdl, "LINE": 64, "LINES": 8}
          for bt, pdl, prenorm in ((16, False, False), (16, True, True), (64, True, False))]),
    ]
    for fn, sig, variants in kernels:
        for consts in variants:
            ptx = _hopper_ptx(fn, sig, consts)
            assert "cp.async.cg.shared.global" in ptx, (fn.__name__, consts)
            if consts.get("SPLIT", 1) > 1:  # the split gate/up kernel, the router
                assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
            # PDL: wait for the kernel before, let the next one launch; the down kernel prefetches its weights
            assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == consts["PDL"]
            if fn is not fused._moe_gate_up:
                assert ("prefetch.global.L2" in ptx) == consts["PDL"]
                if consts["PDL"]:  # the prefetches come before the wait
                    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")
    # the sum kernel, dealing the touched experts out (each program finds which of its token's are its rank's)
    sig = {"y_ptr": "*bf16", "ids_ptr": "*i64", "res_ptr": "*bf16", "out_ptr": "*bf16", "nw_ptr": "*bf16",
           "xn_ptr": "*bf16", "H": "i32", "ep_start": "i32", "E": "i32", "P": "i32", "rank": "i32", "eps": "fp32"}
    for consts in ({"TOP_K": 8, "BH": 1024, "RESIDUAL": True, "NORM": False, "SHARES": 2, "BP": 128, "NW": 2, "PDL": True},
                   {"TOP_K": 8, "BH": 2048, "RESIDUAL": True, "NORM": True, "SHARES": 1, "BP": 128, "NW": 2, "PDL": True}):
        src = triton.compiler.ASTSource(fn=fused._moe_sum, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                                        constexprs=consts)
        assert "griddepcontrol.wait" in triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                                       options={"num_warps": 8}).asm["ptx"]


def test_decode_gemm_kernels_compile_for_hopper():
    """The decode GEMM kernels for sm_90 ahead of time: weight loads pipelined, the split-K count an
    acquire-release atomic with the partial sums read back from L2, and under PDL the weight prefetches
    before the wait."""
    sys.path.insert(0, str(ROOT / "plugins" / "offload"))
    from qwenhw_offload import fused

    kernels = [
        (fused._qkv_rope, {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
                           "cos_ptr": "*bf16", "sin_ptr": "*bf16", "pos_ptr": "*i64", "part_ptr": "*fp32",
                           "cnt_ptr": "*i32", "qo_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "N": "i32",
                           "HQ": "i32", "HK": "i32", "MAX_LEN": "i32", "sc_b": "i32", "eps": "fp32"},
         [{"H": 2048, "HALF": 64, "BT": 16, "BK": 128, "SPLIT": split, "NORM": True, "BIAS": False, "EXACT": False,
           "PDL": pdl, "LINE": 64, "LINES": 8} for split, pdl in ((1, False), (4, True))]),
        (fused._linear_residual, {"x_ptr": "*bf16", "w_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16",
                                  "part_ptr": "*fp32", "cnt_ptr": "*i32", "sq_ptr": "*fp32", "N": "i32", "NOUT": "i32"},
         [{"K": 4096, "BT": bt, "BN": 64, "BK": 128, "SPLIT": split, "RESIDUAL": True, "ROW_SQ": split == 8,
           "EXACT": False, "PDL": pdl, "LINE": 64, "LINES": 8}
          for bt, split, pdl in ((16, 1, False), (16, 8, True), (64, 4, True))]),
    ]
    for fn, sig, variants in kernels:
        for consts in variants:
            ptx = _hopper_ptx(fn, sig, consts)
            assert "cp.async.cg.shared.global" in ptx, (fn.__name__, consts)
            if consts["SPLIT"] > 1 or fn is fused._qkv_rope:  # the head's halves always go through the sums
                assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx, (fn.__name__, consts)
            assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == consts["PDL"]
            assert ("prefetch.global.L2" in ptx) == consts["PDL"]
            if consts["PDL"]:
                assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")

def test_dependent_launch_only_on_cuda_and_switchable(monkeypatch):
    """PDL needs a Hopper-or-later CUDA device and a Triton that launches with it: never on the CPU (the
    interpreter gets PDL=False and no launch option it would not know), and QWENHW_PDL=0 turns it off."""
    pytest.importorskip("triton")
    import torch

    sys.path.insert(0, str(ROOT / "plugins" / "offload"))
    from qwenhw_offload import fused

    assert not fused.pdl(torch.device("cpu")) and fused._launch(torch.device("cpu")) == {"PDL": False}
    assert fused._triton_pdl()  # the pinned Triton has it
    monkeypatch.setattr(fused, "_major", lambda index: 9)  # as if an H100 were there
    assert fused.pdl(torch.device("cuda", 0)) and fused._launch(torch.device("cuda", 0))["launch_pdl"]
    monkeypatch.setenv("QWENHW_PDL", "0")
    assert not fused.pdl(torch.device("cuda", 0))
    monkeypatch.setattr(fused, "_major", lambda index: 8)  # an A100
    monkeypatch.delenv("QWENHW_PDL")
    assert not fused.pdl(torch.device("cuda", 0))
    monkeypatch.setattr(fused, "_major", lambda index: 9)
    monkeypatch.setattr(fused, "_triton_pdl", lambda: False)  # a Triton older than 3.3
    assert not fused.pdl(torch.device("cuda", 0))
