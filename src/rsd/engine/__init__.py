"""rsd's in-process engine: a call's rows in a preallocated KV arena, one forward for prefills, decode tokens and
verifications, decode tokens replayed as CUDA graphs, rsd's Triton kernels on GPUs.

    steps.py      the life of a step: open a call's rows, decode them together until each stops, leave
    runner.py     a model's runner: its arena and forward; decode forwards captured and replayed as CUDA graphs
    transformers_runner.py  the same interface over transformers' own forward (other layouts; RSD_DECODE=eager)
    forward.py    a Llama/Mistral/Qwen body's layers over the arena (Triton kernels, or torch operations)
    weights.py    each layer's projections fused into one matrix product per group
    kv_cache.py   RowCache and PrefixCache (per trajectory, between calls) and the Arena (one call's rows)
    sampler.py    the next token: greedy or top-p with a draw fixed by (seed, trajectory, position)
    kernels/      Triton: packed attention, split (flash-decoding) attention, the layers' small operations
"""
