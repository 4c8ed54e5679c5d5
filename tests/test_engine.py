"""rsd's engine (`rsd.engine`) against transformers' own forward.

Each layout the engine runs (Qwen2, Llama, Qwen3; grouped-query attention) decodes the same tokens with the same
caches through rsd's forward and through transformers', across calls that reuse, roll back and outgrow the arena,
and while rows leave the batch. The runner's entry points (`open`, `extend`, `decode`, `rollback`, `keep`,
`row_cache`) give, for every token, what feeding it alone gives, in both runners. Float32 throughout, on the CPU and,
where a GPU is present, on CUDA (with its CUDA graphs); the Triton kernels have their own tests
(test_triton_kernels.py).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import make_layout_lm, make_tokenizer  # noqa: E402

from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.core import RSDError, StepParams, StepRequest  # noqa: E402
from rsd.engine import forward as engine_forward  # noqa: E402
from rsd.engine.kv_cache import WIDTH_BUCKET, bucket_rows, common_prefix_length  # noqa: E402
from rsd.engine.runner import DECODE_ENV, GraphCache, ModelRunner, engine_problem, make_runner  # noqa: E402
from rsd.engine.transformers_runner import TransformersRunner  # noqa: E402
from rsd.engine.weights import fuse_projections  # noqa: E402

PROMPTS = ["Let x be the number", "What is 12 - 5?", "A train travels 60 miles per hour for", "Step 1:", "So"]
GREEDY = StepParams(delimiter="\n\n")
RUNNERS = {"engine": ModelRunner, "transformers": TransformersRunner}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def build(kind: str, tokenizer, device: str = "cpu", **overrides):
    """A random model of one layout (`tiny.make_layout_lm`) on `device`."""
    return make_layout_lm(kind, tokenizer, **overrides).to(device)


def transformers_generator(model, tokenizer) -> HFStepGenerator:
    """A generator of the same model whose runner is transformers' forward (what RSD_DECODE=eager picks)."""
    gen = HFStepGenerator.from_model(model, tokenizer)
    gen.engine.runner = TransformersRunner(model)
    return gen


def engine_generator(model, tokenizer) -> HFStepGenerator:
    gen = HFStepGenerator.from_model(model, tokenizer)
    assert isinstance(gen.engine.runner, ModelRunner)  # the default for these layouts, on every device
    return gen


def trajectories(gen: HFStepGenerator, caps: list[int], steps: int, params: StepParams = GREEDY) -> list:
    """Several calls over rows of different caps (rows leave the batch at different tokens), then a rollback."""
    prefixes = {f"row{i}": gen.encode(text) for i, text in enumerate(PROMPTS)}
    seen = []
    for step in range(steps):
        requests = [StepRequest(key, prefixes[key], cap + step) for key, cap in zip(prefixes, caps, strict=True)]
        for request, out in zip(requests, gen.generate_steps(requests, params), strict=True):
            prefixes[request.key] += out.token_ids
            seen.append((request.key, out.token_ids, out.stop, out.prefill_tokens, out.context_sum))
    # Every row drops its last three tokens (a rejected proposal) and writes one long step.
    requests = [StepRequest(key, ids[:-3], 24) for key, ids in prefixes.items()]
    for request, out in zip(requests, gen.generate_steps(requests, params), strict=True):
        seen.append((request.key, out.token_ids, out.stop, out.prefill_tokens, out.context_sum))
    return seen


def assert_rows_leave_the_batch_alike(fast: HFStepGenerator, eager: HFStepGenerator) -> None:
    """Five rows start in a bucket of 8; when four have finished, the last one moves to a bucket of 1. Both
    generators write the same tokens."""
    requests = [StepRequest(f"c{i}", fast.encode(text), 2 if i else 10) for i, text in enumerate(PROMPTS)]
    no_delimiter = StepParams(delimiter="")
    got, want = fast.generate_steps(requests, no_delimiter), eager.generate_steps(requests, no_delimiter)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert bucket_rows(5) == 8 and fast.engine.runner.slots == 1


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_the_engine_decodes_what_transformers_decodes(kind, tokenizer, device):
    model = build(kind, tokenizer, device)
    assert engine_problem(model) is None
    eager = transformers_generator(model, tokenizer)
    fast = engine_generator(model, tokenizer)
    assert fast.engine.runner.use_graphs == (device == "cuda")
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=4) == trajectories(eager, caps, steps=4)
    assert_rows_leave_the_batch_alike(fast, eager)
    sampling = StepParams(delimiter="\n\n", temperature=1.0, top_p=0.9, seed=7)
    assert trajectories(fast, caps, 2, sampling) == trajectories(eager, caps, 2, sampling)
    stats = fast.engine.runner.graph_stats
    assert (stats.captures > 0 and stats.held > 0) == (device == "cuda")  # graphs on a GPU only


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_long_tails_run_in_chunks_of_tokens_and_decode_the_same(kind, tokenizer, device, monkeypatch):
    """Torch operations attend row by row in chunks of tokens whose scores fit `TORCH_SCORES_BYTES`: at one byte,
    every token of a tail is a chunk of its own."""
    model = build(kind, tokenizer, device)
    eager = transformers_generator(model, tokenizer)
    fast = engine_generator(model, tokenizer)
    monkeypatch.setattr(engine_forward, "TORCH_SCORES_BYTES", 1)
    chunks = []  # the query rows of every row-by-row attention: groups x tokens of one chunk
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        if query.dim() == 3:  # the engine's row-by-row attention (decode tokens and transformers' are 4-d)
            chunks.append(query.shape[1])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=3) == trajectories(eager, caps, steps=3)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    assert set(chunks) == {groups}  # one token a chunk
    assert len(chunks) > 5 * 4 * model.config.num_hidden_layers  # well over one chunk per row: token by token


def test_a_graphed_forward_returns_the_models_dtype_and_callers_get_float32(tokenizer, device):
    """A graph's memory pool keeps its output: a decode forward returns its logits in the model's dtype (bfloat16
    here), and the runner hands its callers a float32 copy of the same values."""
    runner = ModelRunner(build("qwen2", tokenizer, device).to(torch.bfloat16))
    with torch.inference_mode():
        runner.open([None] * 3, [[5, 9, 7] * 30] * 3, room=50)
        runner.arena.ids[:4] = 11  # what `decode` feeds below
        raw = runner.forward.decode(runner.arena).clone()
        logits = runner.decode(torch.full((4,), 11, dtype=torch.long, device=device))
    assert raw.dtype == torch.bfloat16 and logits.dtype == torch.float32 and raw.abs().max() > 0
    torch.testing.assert_close(logits, raw.float())
    if runner.use_graphs:  # what the graph writes is the model's dtype, into the runner's one output buffer
        _, output = runner._graphs[next(iter(runner._graphs))]
        assert output.dtype == torch.bfloat16
        assert output.untyped_storage().data_ptr() == runner._outputs.untyped_storage().data_ptr()
        assert logits.untyped_storage().data_ptr() != output.untyped_storage().data_ptr()  # the caller's own copy


def test_a_forward_writes_its_output_at_the_front_of_a_given_buffer(tokenizer, device):
    """What a graphed forward does with its runner's output buffer: a plain LM head's product is written there, a
    hooked head's result copied there, a bare body's hidden states too; each the same values as without a buffer."""
    model = build("qwen2", tokenizer, device)
    causal, body = ModelRunner(model), ModelRunner(model, body=model.model)
    with torch.inference_mode():
        for runner in (causal, body):
            runner.open([None] * 3, [[5, 9, 7] * 10] * 3, room=20)
            runner.arena.ids[:4] = 11
        width = causal.forward.output_features
        buffer = torch.full((6 * width,), float("nan"), dtype=model.dtype, device=device)
        logits = causal.forward.decode(causal.arena)
        written = causal.forward.decode(causal.arena, buffer)
        assert written.data_ptr() == buffer.data_ptr() and written.shape == logits.shape == (4, width)
        torch.testing.assert_close(written, logits)
        assert buffer[4 * width :].isnan().all()  # only the front
        hook = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
        try:
            torch.testing.assert_close(causal.forward.decode(causal.arena, buffer), 2 * logits)
        finally:
            hook.remove()
        states = body.forward.decode(body.arena)
        assert body.forward.output_features == model.config.hidden_size == states.shape[1]
        torch.testing.assert_close(body.forward.decode(body.arena, buffer), states)
        assert buffer.data_ptr() == body.forward.decode(body.arena, buffer).data_ptr()


def test_a_decode_forward_is_idempotent_until_the_runner_advances(tokenizer, device):
    """Rows opened with blank prefixes (as the kernel benchmark opens them): a decode forward rewrites the same
    column with the same keys (capturing a graph and the kernels' first check rely on it); `decode` moves on."""
    runner = ModelRunner(build("qwen2", tokenizer, device))
    arena = runner.arena
    with torch.inference_mode():
        runner.open([None] * 3, [[0] * 100] * 3, room=50)
        assert (arena.rows, arena.width, arena.next, arena.lo) == (4, WIDTH_BUCKET, [100] * 3 + [0], [0] * 4)
        first, again = runner.forward.decode(arena).clone(), runner.forward.decode(arena).clone()
        assert torch.equal(first, again) and arena.next[:3] == [100] * 3
        assert arena.cursor[:, :3].tolist() == [[100] * 3, [100] * 3]
        logits = runner.decode(torch.zeros(4, dtype=torch.long, device=device)).clone()
        torch.testing.assert_close(logits[:3], first[:3])
    assert arena.next[:3] == arena.position[:3] == [101] * 3
    assert arena.cursor[:, :3].tolist() == [[101] * 3, [101] * 3]
    assert arena.mask[:3, :101].all() and not arena.mask[:3, 101:].any()


def test_common_prefix_length_finds_the_first_difference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randint(0, 3, (int(torch.randint(0, 40, (1,), generator=generator)),), generator=generator).tolist()
        b = a[: int(torch.randint(0, len(a) + 1, (1,), generator=generator))] + [7] * 3
        b = b if torch.rand(1, generator=generator) < 0.5 else list(a)
        want = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix_length(a, b) == want == common_prefix_length(tuple(a), b)
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_a_row_cache_is_its_real_columns_copied_out_of_the_arena(tokenizer, device):
    """Each row's real columns are one run [lo, next): its cached prefix right-aligned before the call's first
    column, then what it fed (a tail, decoded tokens; rolled-back ones gone). A row cache is that run's first
    columns, in memory of its own: the next call may overwrite the arena."""
    runner = ModelRunner(build("qwen2", tokenizer, device))
    arena = runner.arena
    layers, kv_heads, head_dim = arena.shape
    generator = torch.Generator().manual_seed(1)
    prefixes = [None, *(torch.randn((layers, 2, kv_heads, n, head_dim), generator=generator) for n in (5, 30))]
    prefixes = [p if p is None else p.to(device) for p in prefixes]
    with torch.inference_mode():
        runner.open(prefixes, [[3, 4, 5], [6, 7], [8]], room=8)
        runner.decode(torch.tensor([9, 10, 11, 0], device=device))
        runner.rollback([0, 2, 0])  # the second row forgets its decoded token and its tail's last
        check_row_caches(runner, prefixes)


def check_row_caches(runner, prefixes) -> None:
    arena = runner.arena
    assert (arena.lo[:3], arena.next[:3]) == ([30, 25, 0], [34, 31, 32])
    held = [[3, 4, 5, 9], [*range(5), 6], [*range(30), 8, 11]]
    caches = []
    for slot, ids in enumerate(held):
        cache = runner.row_cache(slot, ids)
        lo = arena.lo[slot]
        assert cache.ids == ids and torch.equal(cache.kv, arena.kv[:, :, slot, :, lo : lo + len(ids)])
        assert cache.kv.is_contiguous() and cache.kv.data_ptr() != arena.kv.data_ptr()
        if prefixes[slot] is not None:  # the cached prefix comes back as it went in
            assert torch.equal(cache.kv[:, :, :, : prefixes[slot].shape[3]], prefixes[slot])
        shorter = runner.row_cache(slot, ids[:2])  # the first tokens of a longer row (a step's last token)
        assert torch.equal(shorter.kv, cache.kv[:, :, :, :2])
        caches.append((cache, cache.kv.clone()))
    arena.kv.add_(1.0)  # the arena takes another call: the copies keep their values
    assert all(torch.equal(cache.kv, want) for cache, want in caches)
    with pytest.raises(AssertionError, match="6 cached columns for 7 tokens"):
        runner.row_cache(1, list(range(7)))


def test_buffers_grow_when_a_call_needs_more_columns(tokenizer, device):
    model = build("qwen2", tokenizer, device)
    eager = transformers_generator(model, tokenizer)
    fast = engine_generator(model, tokenizer)
    arena = fast.engine.runner.arena
    no_delimiter = StepParams(delimiter="")
    prompt = fast.encode(PROMPTS[2])
    short = [StepRequest("a", prompt, 8), StepRequest("b", prompt[:4], 8)]
    assert [o.token_ids for o in fast.generate_steps(short, no_delimiter)] == [
        o.token_ids for o in eager.generate_steps(short, no_delimiter)
    ]
    assert arena.capacity == (2, WIDTH_BUCKET) and arena.generation == 1
    # The same trajectories go on past one bucket of columns: the buffers are made again, wider.
    first = fast.generate_steps(short, no_delimiter)
    longer = [
        StepRequest(r.key, list(r.prefix_ids) + o.token_ids, WIDTH_BUCKET + 40)
        for r, o in zip(short, first, strict=True)
    ]
    eager.generate_steps(short, no_delimiter)
    got = fast.generate_steps(longer, no_delimiter)
    want = eager.generate_steps(longer, no_delimiter)
    assert [(o.token_ids, o.prefill_tokens, o.context_sum) for o in got] == [
        (o.token_ids, o.prefill_tokens, o.context_sum) for o in want
    ]
    assert arena.capacity == (2, 2 * WIDTH_BUCKET) and arena.generation == 2


def test_no_row_writes_past_the_calls_columns(tokenizer):
    """A call's columns are its bucket's. After a wider call the buffers are wider still, and a column past the
    bucket would be written but never seen (the mask and the attention stop at the bucket): feeding past the room
    the call was opened with is refused, a decode token as several tokens."""
    runner = ModelRunner(build("qwen2", tokenizer))
    arena = runner.arena
    with torch.inference_mode():
        runner.open([None], [[1] * 300], room=10)
        runner.open([None], [[1] * 250], room=6)  # one bucket of columns: room for 6 more tokens
        assert (arena.capacity, arena.width) == ((1, 2 * WIDTH_BUCKET), WIDTH_BUCKET)
        for _ in range(6):
            runner.decode(torch.tensor([2]))
        with pytest.raises(AssertionError, match="a row writes column 256 of 256; open the call with more room"):
            runner.decode(torch.tensor([2]))
        runner.rollback([3])
        with pytest.raises(AssertionError, match="a row reaches column 257 of 256"):
            runner.extend([[2] * 4])


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_logits_match_transformers_within_float_error(tokenizer, kind, device):
    """Every decode token's logits (graph replays on CUDA) and every fed token's: a full forward's, within float
    error."""
    model = build(kind, tokenizer, device)
    gen = engine_generator(model, tokenizer)
    prompt = gen.encode(PROMPTS[0])
    out = gen.generate_steps([StepRequest("a", prompt, 6)], StepParams(delimiter=""))[0]
    assert len(gen.engine.prefixes["a"].ids) == len(prompt) + len(out.token_ids) - 1
    ids = torch.tensor([prompt + out.token_ids[:-1]], device=device)
    runner = gen.engine.runner
    with torch.inference_mode():
        reference = model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
        # The same tokens again: the prompt in one forward, then one decode forward per token.
        logits = [runner.open([None], [prompt], room=len(out.token_ids))[0]]
        for token in out.token_ids[:-1]:
            logits.append(runner.decode(torch.tensor([token], device=device))[0].clone())
        # And in one forward of several tokens a row: the prompt, then every written token at once.
        runner.open([None], [prompt], room=len(out.token_ids))
        fed = runner.extend([out.token_ids[:-1]])
    torch.testing.assert_close(torch.stack(logits), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fed, reference[1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_rotation_equal_the_modules(tokenizer, dtype, device):
    from transformers.models.qwen3.modeling_qwen3 import rotate_half

    from rsd.engine.forward import rms_norm, rotate, signed_sin

    model = build("qwen3", tokenizer, device).to(dtype)
    layer = model.model.layers[0]
    torch.manual_seed(1)
    x = torch.randn(3, 1, 64, device=device, dtype=dtype) * 4
    with torch.inference_mode():
        layer.input_layernorm.weight.uniform_(0.5, 2.0)
        norms = [layer.input_layernorm, layer.self_attn.q_norm, model.model.norm]
        heads = torch.randn(3, 4, 1, 16, device=device, dtype=dtype)
        cos, sin = model.model.rotary_emb(x, torch.tensor([[5], [900], [77]], device=device))
        cos, sin = cos[:, None], sin[:, None]
        rotated = rotate(heads, cos, signed_sin(sin))
        expected = heads * cos + rotate_half(heads) * sin
        inputs = [x[..., : norm.weight.shape[0]] for norm in norms]
        normed = [(rms_norm(norm, y), norm(y)) for norm, y in zip(norms, inputs, strict=True)]
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bfloat16: one rounding less than transformers' order
    assert torch.allclose(rotated.float(), expected.float(), atol=tolerance, rtol=tolerance)
    for fused, reference in normed:
        assert torch.allclose(fused.float(), reference.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphs_are_captured_once_per_shape(tokenizer):
    model = build("qwen2", tokenizer, "cuda")
    gen = engine_generator(model, tokenizer)
    eager = transformers_generator(model, tokenizer)
    prompt = gen.encode(PROMPTS[2])
    requests = [StepRequest(f"k{i}", prompt, 10) for i in range(3)]

    def run(generator):
        outputs = generator.generate_steps(requests, StepParams(delimiter=""))
        generator.release([r.key for r in requests])
        return [o.token_ids for o in outputs]

    want = run(eager)
    assert run(gen) == want
    graphs = dict(gen.engine.runner._graphs)
    assert graphs and all(key[1:3] == (4, WIDTH_BUCKET) for key in graphs)  # (tokens a slot, rows, width, ...)
    stats = gen.engine.runner.graph_stats
    assert stats.captures == stats.held == len(graphs) and stats.capture_seconds > 0
    outputs = gen.engine.runner._outputs  # the one buffer every graph writes its logits to
    assert stats.held_bytes == gen.engine.runner._pool_bytes + outputs.numel() * outputs.element_size() > 0
    assert run(gen) == want
    assert gen.engine.runner.graph_stats == stats  # nothing captured again
    assert list(gen.engine.runner._graphs) == list(graphs)
    assert all(gen.engine.runner._graphs[key] is graphs[key] for key in graphs)


def test_the_graph_cache_drops_the_least_recently_used_past_its_count():
    cache = GraphCache(most=3)
    for key in "abc":
        cache.put(key, f"graph {key}")
    assert cache.get("a") == "graph a"  # now the most recently used: "b" goes first
    cache.put("d", "graph d")  # four graphs > 3
    assert list(cache) == ["c", "a", "d"] and cache.get("b") is None
    cache.put("c", "graph c again")  # the same key again: replaced, now the most recently used, nothing dropped
    assert dict(cache) == {"a": "graph a", "d": "graph d", "c": "graph c again"}
    cache.most = 0  # the one just added stays whatever the bound: the call that captured it needs it
    cache.put("e", "graph e")
    assert dict(cache) == {"e": "graph e"}
    cache.clear()
    assert len(cache) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_runners_graphs_share_their_memory_and_decode_the_same(tokenizer):
    """A call of 5 long rows sizes the arena once (8 rows, 512 columns: no later call makes it again, which would
    drop every graph); calls of 1, 2 and 3 short rows then capture decode graphs of 1, 2 and 4 rows. They share the
    runner's memory pool and write their logits into its one output buffer (8 rows of logits, made at the first
    capture); past the cache's count, a call of 5 short rows (a new graph of 8 rows) drops the least recently used
    (the long call's), which is captured again when that call comes back, into the pool's memory it used before (the
    pool does not grow); every call decodes what transformers' forward decodes."""
    model = build("qwen2", tokenizer, "cuda")
    gen = engine_generator(model, tokenizer)
    eager = transformers_generator(model, tokenizer)
    runner = gen.engine.runner
    graphs = runner._graphs

    def run(generator, rows, repeat=1):
        prompts = [generator.encode(PROMPTS[i] * repeat) for i in range(rows)]
        requests = [StepRequest(f"r{rows}-{repeat}-{i}", ids, 6) for i, ids in enumerate(prompts)]
        outputs = generator.generate_steps(requests, GREEDY)
        generator.release([r.key for r in requests])
        return [o.token_ids for o in outputs]

    assert run(gen, 5, repeat=12) == run(eager, 5, repeat=12)
    generation = runner.arena.generation
    assert runner.arena.capacity[0] == 8 and runner.arena.width > WIDTH_BUCKET
    for rows in (1, 2, 3):
        assert run(gen, rows) == run(eager, rows)
    assert runner.arena.generation == generation
    captured = list(graphs)
    decodes = [key for key in captured if key[0] == 1 and key[2] == WIDTH_BUCKET]  # (tokens a slot, rows, width, ...)
    assert {key[1] for key in decodes} >= {1, 2, 4}
    buffer = runner._outputs
    vocabulary = model.lm_head.weight.shape[0]
    assert buffer.numel() == 8 * vocabulary  # the arena's rows of logits: every decode graph fits
    for key in decodes:
        _, output = graphs[key]
        assert output.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert output.shape == (key[1], vocabulary)
    stats = runner.graph_stats
    assert stats.held_bytes == runner._pool_bytes + buffer.numel() * buffer.element_size() > buffer.numel()
    graphs.most = len(graphs)
    assert run(gen, 5) == run(eager, 5)  # 8 rows at the short width: the long call's graph goes
    assert len(graphs) == len(captured) and not set(captured) <= set(graphs)
    captures, pool_bytes = runner.graph_stats.captures, runner._pool_bytes
    assert run(gen, 5, repeat=12) == run(eager, 5, repeat=12)
    assert runner.graph_stats.captures > captures  # the dropped graph, captured again
    assert runner._pool_bytes == pool_bytes  # into the memory it held before
    assert runner.arena.generation == generation and len(graphs) == len(captured)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphs_dropped_with_the_arena_are_captured_again_into_a_new_pool(tokenizer):
    """A call of more rows than the arena has makes it again, which drops every graph (they read the old buffers) and
    their memory pool; the next graphs are captured into a new pool (the old one cannot be captured into again once
    its graphs are gone): no capture fails and every call decodes what transformers' forward decodes."""
    model = build("qwen2", tokenizer, "cuda")
    gen = engine_generator(model, tokenizer)
    eager = transformers_generator(model, tokenizer)
    runner = gen.engine.runner

    def run(generator, rows):
        requests = [StepRequest(f"a{rows}-{i}", generator.encode(PROMPTS[i]), 6) for i in range(rows)]
        outputs = generator.generate_steps(requests, GREEDY)
        generator.release([r.key for r in requests])
        return [o.token_ids for o in outputs]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and goes on without graphs
        assert run(gen, 2) == run(eager, 2)
        pool, generation, captures = runner._pool, runner.arena.generation, runner.graph_stats.captures
        assert captures > 0 and pool is not None
        for _ in range(2):  # more rows than the arena has (made again: every graph dropped), then the same again
            assert run(gen, 5) == run(eager, 5)
        assert runner.arena.generation > generation and runner._pool is not None and runner._pool != pool
        stats = runner.graph_stats
        assert stats.captures > captures and stats.eager == () and stats.held > 0


def short_tail_cases(tokenizer, dtype) -> list[list[list[int]]]:
    """Tails a call opens with through a graph: one token a row (a decode); with rsd's kernels (half precision)
    ragged short tails padded to 8, and one tail of two attention tiles (the tiny model's tile is 64 tokens)."""
    cases = [[[5], [9], [13], [2]]]
    if dtype == torch.bfloat16:
        sum_text = tokenizer.encode(" 3 + 4 = 7")
        cases.append([sum_text, sum_text[:6], sum_text[:7], sum_text[:5]])
        cases.append([tokenizer.encode(" 3 + 4 = 7 and 12 - 5 = 7 ," * 8)[:70]])
    return cases


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bare_body", [False, True])
def test_a_call_with_short_tails_opens_through_a_graph_and_holds_what_an_eager_open_holds(tokenizer, dtype, bare_body):
    """A step after a kept one reads a token, a PRM a step: such a call opens as a graphed decode (one token a row)
    or, with rsd's kernels, a graphed verification of the tails padded to a power of two, for a causal LM and for
    a bare body (a PRM's). Its output for each row's last token and the keys and values it leaves equal an eager
    prefill's, and the call decodes on alike."""
    model = build("qwen2", tokenizer, "cuda").to(dtype)
    network = model.model if bare_body else model

    def runner() -> ModelRunner:
        made = ModelRunner(network, body=network) if bare_body else ModelRunner(network)
        made.forward.packed_checked = True  # as after a call's first (eager) prefill
        return made

    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 6e-2}
    with torch.inference_mode():
        for tails in short_tail_cases(tokenizer, dtype):
            prompts = [tokenizer.encode(text) for text in PROMPTS[: len(tails)]]
            caches = []
            for prompt in prompts:  # each row's prompt cached, as a PrefixCache holds it between calls
                alone = runner()
                alone.open([None], [prompt], 0)
                caches.append(alone.row_cache(0, prompt).kv)
            graphed, eager = runner(), runner()
            got = graphed.open(caches, tails, 16).clone()
            assert graphed._graphs, "the call did not open through a graph"
            assert max(key[0] for key in graphed._graphs) == bucket_rows(max(map(len, tails)))
            eager.arena.open(caches, max(map(len, tails)) + 16)
            want = eager.extend(tails, [1] * len(tails)).clone()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, **tolerance)
            for slot, (prompt, tail) in enumerate(zip(prompts, tails, strict=True)):
                ids = prompt + tail
                torch.testing.assert_close(graphed.row_cache(slot, ids).kv, eager.row_cache(slot, ids).kv, **tolerance)
            step, rows = ids_of(list(range(7, 7 + len(tails))), graphed.slots, "cuda"), len(tails)
            on = graphed.decode(step)[:rows].clone(), eager.decode(step)[:rows].clone()
            torch.testing.assert_close(*on, **tolerance)


def test_unsupported_models_say_why_and_fall_back_to_transformers(tokenizer):
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    tokens = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, **tokens)
    sliding = MistralForCausalLM(MistralConfig(**small, num_key_value_heads=1, intermediate_size=64, sliding_window=16))
    assert "sliding-window" in engine_problem(sliding)
    gpt2_config = GPT2Config(n_embd=32, n_layer=1, n_head=2, bos_token_id=None, **tokens)
    gpt2 = GPT2LMHeadModel(gpt2_config)
    assert engine_problem(gpt2) == (
        "GPT2LMHeadModel does not have the usual decoder layout (model.layers, model.norm, lm_head)"
    )
    gemma = GemmaForCausalLM(GemmaConfig(**small, num_key_value_heads=1, intermediate_size=64, head_dim=16))
    assert engine_problem(gemma) == "model type 'gemma' is not one of llama, mistral, qwen2, qwen3"
    dynamic = LlamaForCausalLM(LlamaConfig(**small, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert "rotary embedding (dynamic) changes with the context length" in engine_problem(dynamic)
    assert "does not have the usual decoder layout" in engine_problem(dynamic.model)  # a body, no LM head
    for model in (sliding, gpt2, gemma, dynamic):
        assert isinstance(make_runner(model.eval()), TransformersRunner)
    # The generator decodes through transformers' forward: a greedy step, as a full forward per token writes it.
    gen = HFStepGenerator.from_model(gpt2, tokenizer)
    assert isinstance(gen.engine.runner, TransformersRunner)
    prompt = gen.encode(PROMPTS[0])
    out = gen.generate_steps([StepRequest("g", prompt, 5)], StepParams(delimiter=""))[0]
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(5):
            ids.append(int(gpt2(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt) :]


def test_rsd_decode_eager_picks_transformers_and_any_other_value_is_one_clear_error(tokenizer, monkeypatch):
    model = build("qwen2", tokenizer)
    monkeypatch.setenv(DECODE_ENV, "eager")
    assert engine_problem(model) == "RSD_DECODE=eager asks for transformers' forward"
    assert isinstance(make_runner(model), TransformersRunner)
    assert isinstance(HFStepGenerator.from_model(model, tokenizer).engine.runner, TransformersRunner)
    for value in ("static", "graphs", "EAGER", "0"):
        monkeypatch.setenv(DECODE_ENV, value)
        message = f"RSD_DECODE='{value}': the one value it takes is 'eager'; unset it or set it to eager."
        with pytest.raises(RSDError, match=f"^{re.escape(message)}$"):
            make_runner(model)
        with pytest.raises(RSDError, match="the one value it takes is 'eager'"):
            HFStepGenerator.from_model(model, tokenizer)
    monkeypatch.setenv(DECODE_ENV, "")  # empty: as if unset
    assert isinstance(make_runner(model), ModelRunner)
    monkeypatch.delenv(DECODE_ENV)
    assert isinstance(make_runner(model), ModelRunner)


def test_a_failed_capture_warns_once_and_decodes_without_graphs(tokenizer):
    """A model on the CPU told to replay graphs, as on a GPU: capturing one fails here, whatever the machine."""
    model = build("qwen2", tokenizer)
    eager = transformers_generator(model, tokenizer)
    fast = engine_generator(model, tokenizer)
    fast.engine.runner.use_graphs = True
    requests = [StepRequest(f"f{i}", fast.encode(text), 6) for i, text in enumerate(PROMPTS[:3])]
    with pytest.warns(
        UserWarning, match="CUDA graph capture failed .* runs its decode forwards without graphs"
    ) as seen:
        got = fast.generate_steps(requests, GREEDY)
    assert len([w for w in seen if "CUDA graph capture failed" in str(w.message)]) == 1
    assert [o.token_ids for o in got] == [o.token_ids for o in eager.generate_steps(requests, GREEDY)]
    assert fast.engine.runner.graph_stats.eager == (1,)  # its decode forwards run without graphs from now on
    more = [StepRequest(f"m{i}", fast.encode(text), 4) for i, text in enumerate(PROMPTS)]
    want = [o.token_ids for o in eager.generate_steps(more, GREEDY)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the next calls decode without graphs
        assert [o.token_ids for o in fast.generate_steps(more, GREEDY)] == want


def storage_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_fused_projections_share_the_models_weights_and_change_no_forward(tokenizer, kind, device):
    model = build(kind, tokenizer, device)
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])], device=device)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    held = storage_bytes(model)
    first = ModelRunner(model).forward.projections
    second = ModelRunner(model).forward.projections  # a second runner of the same model fuses nothing again
    assert first is not None and second is not None
    for layer, a, b in zip(model.model.layers, first, second, strict=True):
        attn = layer.self_attn
        assert a.qkv.data_ptr() == b.qkv.data_ptr() == attn.q_proj.weight.data_ptr()
        assert a.gate_up.data_ptr() == b.gate_up.data_ptr() == layer.mlp.gate_proj.weight.data_ptr()
        assert torch.equal(a.qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        if kind == "qwen2":  # Qwen2's q, k and v have biases; its MLP has none
            assert torch.equal(a.qkv_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert (a.qkv_bias is None) == (kind != "qwen2") and a.gate_up_bias is None
        assert all(p.requires_grad for p in (attn.q_proj.weight, attn.v_proj.weight, layer.mlp.up_proj.weight))
    assert storage_bytes(model) == held  # the weights are not held twice
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)
    # Training the model afterwards still works: the fused weights are plain tensors, not inference tensors.
    model(input_ids=ids).logits.sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
    # Weights changed in place reach the engine: they are the same memory.
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    gate_up = first[1].gate_up
    assert torch.equal(gate_up[gate_up.shape[0] // 2 :], model.model.layers[1].mlp.up_proj.weight)


def test_biased_projections_fuse_with_their_biases(tokenizer):
    model = build("llama", tokenizer, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                module.bias.uniform_(-1.0, 1.0)
    eager = transformers_generator(model, tokenizer)
    want = trajectories(eager, [3, 7, 5, 2, 9], steps=2)
    fast = engine_generator(model, tokenizer)
    projections = fast.engine.runner.forward.projections
    assert projections[0].gate_up_bias is not None and projections[0].qkv_bias is not None
    assert trajectories(fast, [3, 7, 5, 2, 9], steps=2) == want


class AdaptedLinear(torch.nn.Linear):
    """A projection replaced by an adapter (a LoRA-like term on top of the weight): not a plain `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5 * x[..., : self.out_features].flip(-1)


@pytest.mark.parametrize("change", ["hooked", "replaced"])
def test_a_hooked_or_replaced_projection_keeps_the_model_unfused(tokenizer, change):
    """A direct product of fused weights would skip the hook or the adapter: the engine keeps each projection its
    own module, runs torch operations (not the kernels) and decodes what transformers decodes."""
    model = build("qwen2", tokenizer)
    seen = []
    attn = model.model.layers[1].self_attn
    if change == "hooked":
        attn.v_proj.register_forward_hook(lambda module, args, out: seen.append(1))
    else:
        adapted = AdaptedLinear(attn.v_proj.in_features, attn.v_proj.out_features, bias=True)
        adapted.load_state_dict(attn.v_proj.state_dict())
        attn.v_proj = adapted
    eager = transformers_generator(model, tokenizer)
    want = trajectories(eager, [4, 6, 3, 8, 5], steps=2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert fuse_projections(model.model.layers) is None
    fast = engine_generator(model, tokenizer)
    assert fast.engine.runner.forward.projections is None
    assert "projections are not fused" in fast.engine.runner.forward.kernels_problem()
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # and nothing was re-pointed
    seen.clear()
    assert trajectories(fast, [4, 6, 3, 8, 5], steps=2) == want
    assert seen or change == "replaced"  # the hook ran in the engine's forwards too


# -- the runner interface: several tokens a row, rollbacks, rows leaving -----------------------------------------


def open_rows(kind: str, model, prompts: list[list[int]], room: int = 24):
    runner = RUNNERS[kind](model)
    runner.open([None] * len(prompts), prompts, room)
    return runner


def full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()


def ids_of(values: list[int], slots: int, device) -> torch.Tensor:
    """One id per slot (0 for the slots past `values`)."""
    return torch.tensor(values + [0] * (slots - len(values)), device=device)


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_extend_of_several_tokens_a_row_equals_decoding_them_one_by_one(tokenizer, kind, device):
    """Ragged feeds (8, 0 and 3 tokens; the last slots of the bucket none): one `extend` gives, for every fed token,
    the logits that decoding the tokens one at a time gives, and a full forward's; both runners then hold the same
    keys and values."""
    model = build("llama", tokenizer, device)
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]
    fed = [tokenizer.encode(" 3 + 4 = 7"), [], tokenizer.encode(" x =")]
    assert [len(f) for f in fed] == [8, 0, 3]
    with torch.inference_mode():
        together = open_rows(kind, model, prompts)
        got = together.extend(fed).clone()
        assert got.shape[0] == sum(map(len, fed))
        reference = [full_forward_logits(model, p + f)[len(p) :] for p, f in zip(prompts, fed, strict=True) if f]
        torch.testing.assert_close(got, torch.cat(reference), atol=1e-4, rtol=1e-4)
        alone = open_rows(kind, model, prompts)
        rows = [(slot, j) for slot, f in enumerate(fed) for j in range(len(f))]  # extend's order, row after row
        longest = max(map(len, fed))
        for j in range(longest):  # every slot takes a token: past its feed, a filler that is rolled back below
            logits = alone.decode(ids_of([f[j] if j < len(f) else 1 for f in fed], alone.slots, device)).clone()
            for slot, f in enumerate(fed):
                if j < len(f):
                    torch.testing.assert_close(logits[slot], got[rows.index((slot, j))], atol=1e-4, rtol=1e-4)
        alone.rollback([longest - len(f) for f in fed])
        for slot, (prompt, f) in enumerate(zip(prompts, fed, strict=True)):
            ids = prompt + f
            torch.testing.assert_close(
                alone.row_cache(slot, ids).kv, together.row_cache(slot, ids).kv, atol=1e-5, rtol=1e-5
            )
        # Both go on alike: one more token a row.
        step = ids_of([7, 8, 9], together.slots, device)
        torch.testing.assert_close(
            together.decode(step)[:3].clone(), alone.decode(step)[:3].clone(), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_rollback_then_extend_equals_a_fresh_runner(tokenizer, kind, device):
    """A verification keeps a proposal's first tokens and feeds others after them: rolling back the rest and
    extending gives what a fresh runner holding the kept sequence gives, without copying the kept part."""
    model = build("qwen2", tokenizer, device)
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]
    proposals = [tokenizer.encode(" 3 + 4 = 7"), tokenizer.encode(" x = 6"), tokenizer.encode(" So")]
    kept = [2, 0, len(proposals[2])]
    others = [tokenizer.encode(" 12 - 5"), tokenizer.encode(" The answer"), []]
    sequences = [p + q[:k] for p, q, k in zip(prompts, proposals, kept, strict=True)]
    with torch.inference_mode():
        runner = open_rows(kind, model, prompts)
        runner.extend(proposals)
        runner.rollback([len(q) - k for q, k in zip(proposals, kept, strict=True)])
        if kind == "engine":
            arena = runner.arena
            assert [n - lo for n, lo in zip(arena.next[:3], arena.lo[:3], strict=True)] == list(map(len, sequences))
            kept_columns = [arena.kv[:, :, s, :, arena.lo[s] : arena.next[s]].clone() for s in range(3)]
            storage = arena.kv.data_ptr()
        else:  # transformers' cache keeps every column; the rolled-back ones become holes in the mask
            assert [len(c) for c in runner.columns] == list(map(len, sequences))
            assert int(runner.mask.sum()) == sum(map(len, sequences))
        got = runner.extend(others)
        fresh = open_rows(kind, model, sequences)
        torch.testing.assert_close(got, fresh.extend(others), atol=1e-4, rtol=1e-4)
        for slot, (sequence, other) in enumerate(zip(sequences, others, strict=True)):
            ids = sequence + other
            torch.testing.assert_close(
                runner.row_cache(slot, ids).kv, fresh.row_cache(slot, ids).kv, atol=1e-5, rtol=1e-5
            )
        if kind == "engine":  # the kept part stayed where it was, untouched
            assert arena.kv.data_ptr() == storage
            for slot, columns in enumerate(kept_columns):
                lo = arena.lo[slot]
                assert torch.equal(arena.kv[:, :, slot, :, lo : lo + columns.shape[3]], columns)
        step = ids_of([7, 8, 9], runner.slots, device)
        got = runner.decode(step)[:3].clone()
        torch.testing.assert_close(got, fresh.decode(step)[:3].clone(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_keep_after_extend_and_rollback_keeps_each_rows_bookkeeping(tokenizer, kind, device):
    """Five rows (a bucket of 8 in the engine) fed ragged tokens, some rolled back; two stay: they move to the front
    with their keys, values, columns and positions, and go on as a fresh runner of those two rows goes on."""
    model = build("qwen3", tokenizer, device)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    fed = [tokenizer.encode(text) for text in (" 3 + 4", "", " x = 6", " 12 - 5 = 7", " y")]
    dropped = [1, 0, 2, 1, 0]
    sequences = [p + f[: len(f) - d] for p, f, d in zip(prompts, fed, dropped, strict=True)]
    with torch.inference_mode():
        runner = open_rows(kind, model, prompts)
        runner.extend(fed)
        runner.rollback(dropped)
        assert runner.keep(list(range(5))) is None  # every row stays: nothing moves
        before = {slot: runner.row_cache(slot, sequences[slot]).kv for slot in (1, 3)}
        if kind == "engine":
            arena = runner.arena
            bookkeeping = [(arena.lo[s], arena.next[s], arena.position[s]) for s in (1, 3)]
        index = runner.keep([1, 3])
        assert index.tolist() == [1, 3] and runner.slots == 2
        for new, old in enumerate((1, 3)):
            assert torch.equal(runner.row_cache(new, sequences[old]).kv, before[old])
        if kind == "engine":
            assert [(arena.lo[s], arena.next[s], arena.position[s]) for s in (0, 1)] == bookkeeping
            assert arena.position[:2] == [len(sequences[1]), len(sequences[3])]
        fresh = open_rows(kind, model, [sequences[1], sequences[3]])
        step = ids_of([11, 12], runner.slots, device)
        torch.testing.assert_close(runner.decode(step).clone(), fresh.decode(step).clone(), atol=1e-4, rtol=1e-4)
        more = [tokenizer.encode(" Then"), tokenizer.encode(" 60 * 2")]
        torch.testing.assert_close(runner.extend(more), fresh.extend(more), atol=1e-4, rtol=1e-4)
        for new, old in enumerate((1, 3)):
            ids = sequences[old] + [11 + new] + more[new]
            torch.testing.assert_close(
                runner.row_cache(new, ids).kv, fresh.row_cache(new, ids).kv, atol=1e-5, rtol=1e-5
            )
