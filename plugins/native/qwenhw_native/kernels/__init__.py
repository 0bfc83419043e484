"""The native engine's Triton decode kernels, one module per family, each with its wrapper and its check of
what it takes:

    common      Triton (optional), `available`, dependent launch (PDL), shared helpers, counters
    tiles       tile shapes and size limits: defaults, and per-GPU JSON files the bench sweeps write
    rope_cache  q/k RMSNorm + RoPE + KV-cache write
    linear      decode GEMMs: q/k/v (+ rope_cache's arithmetic), o_proj + residual
    router      softmax + top-k + renormalise (+ the router GEMM, + the post-attention RMSNorm)
    moe         the routed experts: gate/up, down, sum (+ residual, + the next RMSNorm)
    attention   split-KV decode attention over the static cache
    reduce      tensor parallel: all-reduce + RMSNorm over symmetric memory

The runtime decides per call which to use (qwenhw_native.config.KernelConfig says which are on).
"""
