"""GPU checks of the native runtime that the CPU tests cannot make (they run torch's paths, not the CUDA
kernels and graphs): random bf16 weights of the model directory's shape, a few layers.

- packed prefill (FlashAttention's variable-length kernel): prompts of different lengths in one pass give
  the last-token logits each gives alone, and so do they in chunks (each later chunk over its earlier keys);
- continuous batching under CUDA graphs: prompts joining rows while others decode get the greedy tokens
  they get alone; with the engine's defaults (asynchronous decode steps), with them off
  (KernelConfig.async_steps) and with prompt passes that carry the decoding rows' tokens (.mixed, off by
  default; there in 256-token chunks);
- the MoE decode kernels with each program finding its own pairs (Tiles.moe_index_pairs past the step's), and
  with their programs over blocks of the sorted pairs (Tiles.moe_blocks): the same greedy tokens as the
  default, a step's pairs sorted once per layer, bit for bit;
- a paged KV cache (kv_cache.py) whose pool of 2048 slots makes sequences wait for pages, and one of 1024 where
  answers that reach a second page make the newest sequences give theirs back and go in again (preemption by
  recomputation): the greedy tokens they get alone (their batches differ from the static cache's, so not bit
  for bit);
- prefix caching: prompts that start like an earlier one go in over its pages: the tokens they get without.

    python bench/check_runtime.py DIR --layers 4      # DIR: side_by_side.py prepare's folder

Prints one line per check and exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import random_model  # noqa: E402


def agreement(together: list[list[int]], alone: list[list[int]]) -> list[int]:
    """Each sequence's greedy tokens equal to alone before its first difference (random weights: near-ties in bf16
    may flip one token between batch sizes, and the rest follow it; a wrong position or slot flips all of them)."""
    return [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(together, alone)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    import torch

    from qwenhw_native.config import KernelConfig
    from qwenhw_native.kernels import tiles
    from qwenhw_native.runtime import Runtime, SampleParams

    model = random_model(args.model, "cuda", args.layers)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 150000, (n,), generator=g).tolist() for n in (700, 33, 1500, 5, 260)]
    failed = False

    rt = Runtime(model, max_len=2048, device="cuda", batch=len(prompts))
    alone = torch.stack([rt.prefill([p])[0] for p in prompts]).float()
    for label, chunk in ((f"packed prefill of {[len(p) for p in prompts]} tokens", rt.prefill_chunk),
                         ("chunked prefill (256-token chunks, each later one over its earlier keys)", 256)):
        rt.prefill_chunk = chunk
        got = rt.prefill(prompts).float()
        err = ((got - alone).norm(dim=-1) / alone.norm(dim=-1)).max().item()
        same = (got.argmax(-1) == alone.argmax(-1)).all().item()
        ok = err < 2e-2 and same
        failed |= not ok
        print(f"{label} vs one at a time: max relative L2 {err:.2e}, argmax {'equal' if same else 'DIFFERENT'}: "
              f"{'ok' if ok else 'FAILED'}")

    most = [40, 5, 17, 9, 3]
    one = Runtime(model, max_len=2048, device="cuda", batch=1)
    one.warm()
    each = [one.generate_batch([p], m, SampleParams(), set())[0] for p, m in zip(prompts, most)]
    defaults = KernelConfig.resolve()
    first = None
    for label, kernels, changes, pool in (("defaults", defaults, {}, 0),
                                          ("async_steps off", replace(defaults, async_steps=False), {}, 0),
                                          ("mixed passes", replace(defaults, mixed=True), {}, 0),
                                          ("each program finds its pairs", defaults, {"moe_index_pairs": 1 << 30}, 0),
                                          ("MoE programs over blocks of pairs", defaults, {"moe_blocks": True}, 0),
                                          ("paged KV, 2048-slot pool", defaults, {}, 2048)):
        with tiles.override(torch.device("cuda"), **changes):  # graphs keep the tiles they were captured with
            rt = Runtime(model, max_len=2048, device="cuda", batch=2, kernels=kernels, kv_tokens=pool)
            rt.warm()
        if kernels.mixed:  # the long prompts' chunks ride the decode steps too
            rt.prefill_chunk = 256
        together = [[] for _ in prompts]
        for seq, token, _ in rt.stream_batch(prompts, most, SampleParams(), set()):
            together[seq].append(token)
        first = first or together
        if changes and not pool and together != first:  # the same arithmetic in another order of programs: equal tokens
            failed = True
            print(f"{label}: greedy tokens differ from the defaults': FAILED")
        prefix = agreement(together, each)
        agree, total = sum(prefix), sum(most)
        ok = [len(t) for t in together] == most and agree >= 0.5 * total
        failed |= not ok
        print(f"continuous batching ({label}; 2 rows, 5 prompts joining) vs alone: {agree}/{total} greedy tokens "
              f"equal before a first difference {prefix}: {'ok' if ok else 'FAILED'}")
        del rt

    # preemption: three 250-token prompts in a pool of four pages go in with one page each; at their 7th token
    # each needs a second, which the pool has for one: the newest give theirs back and go in again later
    short = [torch.randint(1000, 150000, (250,), generator=g).tolist() for _ in range(3)]
    each = [one.generate_batch([p], 40, SampleParams(), set())[0] for p in short]
    rt = Runtime(model, max_len=1024, device="cuda", batch=3, kv_tokens=1024)
    rt.warm()
    together = rt.generate_batch(short, 40, SampleParams(), set())
    prefix = agreement(together, each)
    ok = [len(t) for t in together] == [40] * 3 and sum(prefix) >= 60 and rt.preemptions >= 1
    failed |= not ok
    print(f"paged KV, 1024-slot pool, {rt.preemptions} preemption(s): {sum(prefix)}/120 greedy tokens equal to "
          f"alone before a first difference {prefix}: {'ok' if ok else 'FAILED'}")

    # prefix caching: a prompt that starts like an earlier one (512 tokens: two pages) goes in from its first token
    # after them, over the keys they hold; the first prompt again finds two of its three pages
    base = torch.randint(1000, 150000, (700,), generator=g).tolist()
    alike = base[:512] + torch.randint(1000, 150000, (100,), generator=g).tolist()
    runs = []
    for cached in (False, True):
        rt = Runtime(model, max_len=1024, device="cuda", batch=2, kv_tokens=4096, prefix_caching=cached)
        rt.warm()
        runs.append([rt.generate_batch([p], 40, SampleParams(), set())[0] for p in (base, alike, base)])
    prefix = agreement(runs[1], runs[0])
    ok = sum(prefix) >= 60 and runs[1][0] == runs[0][0] and rt.cache.hit == 1024
    failed |= not ok
    print(f"prefix caching, {rt.cache.hit} of {rt.cache.queried} prompt tokens found: {sum(prefix)}/120 greedy "
          f"tokens equal to no cache before a first difference {prefix}: {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
