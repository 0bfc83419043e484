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
    out[name] = {"q": rel(qo, qr), "k": rel(kc[:, :, p:p + 1], kr), "v_exact": torch.equal(vc[:, :, p], v[:, 0]),
                 "untouched_nan": bool(kc[:, :, :p].isnan().all()), "route_ids": torch.equal(i.sort(-1).values, i_ref.sort(-1).values),  # ties may swap order
                 "route_w": rel(w, w_ref)}
print(json.dumps(out))
'''

RUNTIME = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
from qwenhw_offload.runtime import Runtime, SampleParams
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompt = [785, 6722, 315, 9625, 374, 264]
rt = Runtime(model, 64, "cpu", graphs=False)
assert rt.fused
tokens = list(rt.generate(prompt, 8, SampleParams(), set()))
with torch.no_grad():
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
print(json.dumps({"fused": tokens, "hf": ref}))
'''


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


def test_runtime_decodes_through_the_fused_kernels(tiny_moe):
    out = _interpret(RUNTIME, str(tiny_moe))
    assert out["fused"] == out["hf"]
