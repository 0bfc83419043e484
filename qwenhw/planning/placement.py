"""Where each module of a Qwen checkpoint goes: GPU, host RAM or disk. Pure: sizes in, device map out.

Module names follow transformers' Qwen3 / Qwen3-MoE / Qwen3-Next classes. For MoE models the routed experts
of each layer are one module (`model.layers.N.mlp.experts`), so experts can go to host RAM while attention,
norms and the router stay on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenhw.models import memory as mm
from qwenhw.models.spec import ModelSpec


@dataclass(frozen=True)
class Piece:
    name: str
    nbytes: float
    expert: bool = False


@dataclass
class Placement:
    device_map: dict[str, str] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)  # device -> weight bytes
    experts_off_gpu: int = 0  # layers whose experts are not on the GPU
    expert_bytes_on: dict[str, float] = field(default_factory=dict)


def pieces(spec: ModelSpec, split_experts: bool) -> list[Piece]:
    """The checkpoint as device-map pieces, in forward order, with their weight bytes."""
    wb = mm.weight_bytes_split(spec)
    emb_each = wb.embeddings if spec.tie_embeddings else wb.embeddings / 2
    # scale the parameter-count split so the pieces add up to the exact on-disk total
    ne_params = sum(spec.layer_params(i)[0] for i in range(spec.num_layers)) or 1
    ne_scale = wb.non_expert / ne_params
    out = [Piece("model.embed_tokens", emb_each)]
    la = spec.linear_attention
    for i in range(spec.num_layers):
        non_expert, _ = spec.layer_params(i)
        prefix = f"model.layers.{i}"
        experts = mm.expert_bytes(spec) * spec.moe.num_experts if spec.is_moe_layer(i) and spec.moe else 0
        if split_experts and experts:
            attn = "linear_attn" if la and (i + 1) % la.full_attention_interval else "self_attn"
            # everything in the layer but the experts, as named modules accelerate can place
            names = [f"{prefix}.{attn}", f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm",
                     f"{prefix}.mlp.gate"]
            if spec.moe and spec.moe.shared_expert_intermediate_size:
                names += [f"{prefix}.mlp.shared_expert", f"{prefix}.mlp.shared_expert_gate"]
            share = non_expert * ne_scale / len(names)
            out += [Piece(n, share) for n in names]
            out.append(Piece(f"{prefix}.mlp.experts", experts, expert=True))
        else:
            out.append(Piece(prefix, non_expert * ne_scale + experts, expert=bool(experts)))
    out.append(Piece("model.norm", 0.0))
    out.append(Piece("model.rotary_emb", 0.0))
    out.append(Piece("lm_head", 0.0 if spec.tie_embeddings else emb_each))
    return out


def place(spec: ModelSpec, budgets: list[tuple[str, float]], experts_last: bool) -> Placement | None:
    """Fill devices in order (e.g. [("cuda:0", b), ("cpu", b), ("disk", b)]).

    With `experts_last`, every non-expert piece is placed first (so attention stays on the fastest device)
    and routed experts fill what is left. Returns None when even the last device overflows.
    """
    items = pieces(spec, split_experts=experts_last)
    order = [p for p in items if not p.expert] + [p for p in items if p.expert] if experts_last else items
    free = dict(budgets)
    result = Placement(used={n: 0.0 for n in free}, expert_bytes_on={n: 0.0 for n in free})
    for piece in order:  # first fit, fastest device first
        dev = next((n for n, room in free.items() if piece.nbytes <= room + 1e-6), None)
        if dev is None:
            return None
        free[dev] -= piece.nbytes
        result.device_map[piece.name] = dev
        result.used[dev] += piece.nbytes
        if piece.expert:
            result.expert_bytes_on[dev] += piece.nbytes
    first = budgets[0][0]
    result.experts_off_gpu = sum(1 for p in items if p.expert and result.device_map[p.name] != first)
    return result
