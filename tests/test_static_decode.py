"""The static-buffer decode path (`rsd.backends.static_decode`) against transformers' own forward.

Each supported layout (Qwen2, Llama, Qwen3; grouped-query attention) decodes the same tokens with the same caches
through both paths, across calls that reuse, roll back and outgrow the buffers, and while rows leave the batch.
On CUDA (RSD_TEST_DEVICE=cuda) the CUDA-graph replay is checked the same way; float32 throughout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from rsd.backends.kv import common_prefix_length  # noqa: E402
from rsd.backends.static_decode import (  # noqa: E402
    DECODE_ENV,
    WIDTH_BUCKET,
    StaticDecoder,
    bucket_rows,
    column_runs,
    resolve_decode_mode,
    static_decode_problem,
)
from tiny import make_tokenizer  # noqa: E402

from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.core import RSDError, StepParams, StepRequest  # noqa: E402

DEVICE = os.environ.get("RSD_TEST_DEVICE", "cpu")
NEEDS_CUDA_GRAPHS = "CUDA graphs need a GPU: run with RSD_TEST_DEVICE=cuda on one"
FAST_PATHS = ["static"] + (["graphs"] if DEVICE.startswith("cuda") else [])
PROMPTS = ["Let x be the number", "What is 12 - 5?", "A train travels 60 miles per hour for", "Step 1:", "So"]
GREEDY = StepParams(delimiter="\n\n")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def build(kind: str, tokenizer, **overrides):
    """A random model of one layout: 4 query heads over 2 key heads, sharpened so positions and masks matter."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_class, model_class = classes[kind]
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = model_class(config_class(**{**fields, **overrides})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model.to(DEVICE)


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
    assert bucket_rows(5) == 8 and fast._static.rows == 1


@pytest.mark.parametrize("prefill", ["arena", "transformers"])
@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_fast_paths_decode_what_transformers_decodes(kind, path, prefill, tokenizer):
    """Both prefills of the static path: the decoder's own forward in its arena (as shipped), and transformers'
    forward over a stacked cache, copied into the arena."""
    model = build(kind, tokenizer)
    assert static_decode_problem(model) is None
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    fast = HFStepGenerator.from_model(model, tokenizer, decode=path)
    fast.arena_prefill = prefill == "arena"
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=4) == trajectories(eager, caps, steps=4)
    assert_rows_leave_the_batch_alike(fast, eager)
    sampling = StepParams(delimiter="\n\n", temperature=1.0, top_p=0.9, seed=7)
    assert trajectories(fast, caps, 2, sampling) == trajectories(eager, caps, 2, sampling)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_long_tails_prefill_in_chunks_of_tokens_and_decode_the_same(kind, tokenizer):
    model = build(kind, tokenizer)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    fast = HFStepGenerator.from_model(model, tokenizer, decode="static")
    fast._static.prefill_mask_bytes = 1  # one token per chunk: every tail longer than one token is chunked
    chunks = []
    run_chunk = fast._static._prefill_chunk
    fast._static._prefill_chunk = lambda *args: chunks.append(args[-1]) or run_chunk(*args)
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=3) == trajectories(eager, caps, steps=3)
    assert {end - start for start, end in chunks} == {1}
    assert len(chunks) > 5 * 4  # well over one chunk per call: the prompts ran token by token


@pytest.mark.parametrize("path", FAST_PATHS)
def test_a_blank_batch_replays_the_same_forward_until_it_advances(path, tokenizer):
    model = build("qwen2", tokenizer).to(DEVICE)
    static = StaticDecoder(model, use_graphs=path == "graphs")
    static.load_blank(rows=3, filled=100, new_tokens=50)
    assert (static.rows, static.width, static.next_column) == (4, WIDTH_BUCKET, 100)
    with torch.inference_mode():
        first, again = static.replay().clone(), static.replay().clone()
        assert torch.equal(first, again) and static.next_column == 100  # the same column, rewritten
        static.advance(first.argmax(dim=-1))
    assert static.next_column == 101 and int(static.positions[0, 0]) == 101


def test_column_runs_find_every_stretch_of_consecutive_columns():
    assert column_runs([]) == []
    assert column_runs([5]) == [(5, 6)]
    assert column_runs(list(range(3, 700))) == [(3, 700)]
    assert column_runs([0, 1, 2, 5, 6, 9, 11, 12, 13]) == [(0, 3), (5, 7), (9, 10), (11, 14)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):  # random subsets: the runs cover exactly the columns, in order, none touching the next
        columns = torch.nonzero(torch.rand(300, generator=generator) < 0.8).squeeze(-1).tolist()
        runs = column_runs(columns)
        assert [c for start, end in runs for c in range(start, end)] == columns
        assert all(end < start for (_, end), (start, _) in zip(runs, runs[1:], strict=False))


def test_common_prefix_length_finds_the_first_difference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randint(0, 3, (int(torch.randint(0, 40, (1,), generator=generator)),), generator=generator).tolist()
        b = a[: int(torch.randint(0, len(a) + 1, (1,), generator=generator))] + [7] * 3
        b = b if torch.rand(1, generator=generator) < 0.5 else list(a)
        want = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix_length(a, b) == want == common_prefix_length(tuple(a), b)
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_a_row_cache_is_its_real_columns_copied_out_of_the_arena(tokenizer):
    """Any set of columns (a prefix, a tail, decoded tokens, holes between them) comes out as `index_select`
    would take it, in memory of its own: the next batch may overwrite the arena."""
    static = StaticDecoder(build("qwen2", tokenizer), use_graphs=False)
    static.load_blank(rows=3, filled=100, new_tokens=20)
    static.kv.copy_(torch.randn(static.kv.shape, generator=torch.Generator().manual_seed(1)))
    for columns in ([], [7], list(range(10, 60)), list(range(0, 20)) + list(range(40, 90)) + [99, 101, 102]):
        cache = static.row_cache(1, list(range(len(columns))), columns)
        want = static.kv[:, :, 1].index_select(3, torch.tensor(columns, dtype=torch.long, device=static.kv.device))
        assert torch.equal(cache.kv, want) and cache.kv.is_contiguous()
        assert cache.kv.data_ptr() != static.kv.data_ptr()
        static.kv.add_(1.0)  # the arena takes another batch: the copy keeps its values
        assert torch.equal(cache.kv, want)
    with pytest.raises(AssertionError, match="2 cached columns for 3 tokens"):
        static.row_cache(0, [1, 2, 3], [4, 5])


@pytest.mark.parametrize("path", FAST_PATHS)
def test_buffers_grow_when_a_call_needs_more_columns(path, tokenizer):
    model = build("qwen2", tokenizer)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    fast = HFStepGenerator.from_model(model, tokenizer, decode=path)
    no_delimiter = StepParams(delimiter="")
    prompt = fast.encode(PROMPTS[2])
    short = [StepRequest("a", prompt, 8), StepRequest("b", prompt[:4], 8)]
    assert [o.token_ids for o in fast.generate_steps(short, no_delimiter)] == [
        o.token_ids for o in eager.generate_steps(short, no_delimiter)
    ]
    assert fast._static.capacity == (2, WIDTH_BUCKET)
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
    assert fast._static.capacity == (2, 2 * WIDTH_BUCKET)


@pytest.mark.parametrize(
    "fused, projections, attention",
    [
        (True, True, "sdpa"),
        (True, True, "split"),
        (True, True, "triton"),
        (True, False, "sdpa"),
        (False, False, "sdpa"),
    ],
    ids=["fused-kernels-and-projections", "split-attention", "triton-kernels", "fused-kernels", "transformers-modules"],
)
@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_logits_match_transformers_within_float_error(tokenizer, kind, fused, projections, attention):
    if attention in ("split", "triton"):
        pytest.importorskip("triton", reason="rsd's decode kernels need Triton: pip install -e '.[dev]'")
    model = build(kind, tokenizer)
    gen = HFStepGenerator.from_model(model, tokenizer, decode="static")
    gen._static.fused_kernels = fused
    gen._static.fuse_projections = projections
    # "triton": the split attention and, where the layout allows them (not Qwen3's), the layer kernels.
    gen._static.attention = "split" if attention == "triton" else attention
    gen._static.layer_kernels = attention == "triton" and gen._static.layer_kernels_problem() is None
    prompt = gen.encode(PROMPTS[0])
    out = gen.generate_steps([StepRequest("a", prompt, 6)], StepParams(delimiter=""))[0]
    ids = torch.tensor([prompt + out.token_ids[:-1]], device=DEVICE)
    with torch.inference_mode():
        reference = model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
    # Decode the same tokens again through the static buffers and compare every step's logits.
    static = gen._static
    cache = gen._caches["a"]
    assert len(cache.ids) == len(prompt) + len(out.token_ids) - 1
    gen.release(["a"])
    from transformers import DynamicCache

    with torch.inference_mode():
        prefill = DynamicCache()
        first = model(input_ids=ids[:, : len(prompt)], cache=prefill, use_cache=True).logits[0, -1].float()
        static.load(prefill, torch.ones((1, len(prompt)), dtype=torch.long), [len(prompt)], len(out.token_ids))
        feed = [torch.tensor([token], device=static.device) for token in out.token_ids[:-1]]
        logits = [first] + [static.advance(token)[0] for token in feed]
    assert torch.allclose(torch.stack(logits), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_rotation_equal_the_modules(tokenizer, dtype):
    from rsd.backends.static_decode import rms_norm, rotate, rotate_half, signed_sin

    model = build("qwen3", tokenizer).to(dtype)
    layer = model.model.layers[0]
    torch.manual_seed(1)
    x = torch.randn(3, 1, 64, device=DEVICE, dtype=dtype) * 4
    with torch.inference_mode():
        layer.input_layernorm.weight.uniform_(0.5, 2.0)
        norms = [layer.input_layernorm, layer.self_attn.q_norm, model.model.norm]
        heads = torch.randn(3, 4, 1, 16, device=DEVICE, dtype=dtype)
        cos, sin = model.model.rotary_emb(x, torch.tensor([[5], [900], [77]], device=DEVICE))
        cos, sin = cos[:, None], sin[:, None]
        rotated = rotate(heads, cos, signed_sin(sin))
        expected = heads * cos + rotate_half(heads) * sin
        inputs = [x[..., : norm.weight.shape[0]] for norm in norms]
        normed = [(rms_norm(norm, y), norm(y)) for norm, y in zip(norms, inputs, strict=True)]
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bfloat16: one rounding less than transformers' order
    assert torch.allclose(rotated.float(), expected.float(), atol=tolerance, rtol=tolerance)
    for fused, reference in normed:
        assert torch.allclose(fused.float(), reference.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_compiled_layers_decode_the_same_tokens_with_one_compile_for_all_layers(kind, path, tokenizer):
    from torch._dynamo.testing import CompileCounter

    model = build(kind, tokenizer, num_hidden_layers=4)
    plain = HFStepGenerator.from_model(model, tokenizer, decode=path)
    compiled = HFStepGenerator.from_model(model, tokenizer, decode=path)
    # On a GPU the real compiler (Triton kernels under the graph capture); on the CPU a counting backend, which
    # traces what inductor would compile without the minutes of C++ builds.
    counter = CompileCounter()
    compiled._static.compile_layers(backend="inductor" if DEVICE.startswith("cuda") else counter)
    caps = [3, 5, 7, 4, 6]
    assert trajectories(compiled, caps, steps=3) == trajectories(plain, caps, steps=3)
    assert compiled._static.compiled  # no fallback happened
    if not DEVICE.startswith("cuda"):
        # Two functions, each traced for one row (sizes of 1 are specialised) and for any other count: the same
        # code serves all 4 layers; compiling per layer would show 16.
        assert 2 <= counter.frame_count <= 4
    torch._dynamo.reset()


def test_a_failed_compile_warns_and_decodes_without_it(tokenizer, monkeypatch):
    from rsd.backends.static_decode import COMPILE_ENV

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    model = build("qwen2", tokenizer)
    monkeypatch.setenv(COMPILE_ENV, "1")
    gen = HFStepGenerator.from_model(model, tokenizer, decode="static")
    assert gen._static.compiled  # the variable turned it on
    gen._static.compile_layers(backend=broken_backend)
    plain = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    with pytest.warns(UserWarning, match="torch.compile of the decode layers failed.*no compiler here"):
        got = trajectories(gen, [4, 6, 3, 5, 2], steps=2)
    assert not gen._static.compiled
    assert got == trajectories(plain, [4, 6, 3, 5, 2], steps=2)
    torch._dynamo.reset()


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason=NEEDS_CUDA_GRAPHS)
def test_graphs_are_captured_once_per_shape(tokenizer):
    model = build("qwen2", tokenizer)
    gen = HFStepGenerator.from_model(model, tokenizer, decode="graphs")
    prompt = gen.encode(PROMPTS[2])
    requests = [StepRequest(f"k{i}", prompt, 10) for i in range(3)]
    gen.generate_steps(requests, StepParams(delimiter=""))
    graphs = dict(gen._static._graphs)
    gen.release([r.key for r in requests])
    gen.generate_steps(requests, StepParams(delimiter=""))
    assert list(gen._static._graphs) == list(graphs)
    assert all(gen._static._graphs[key] is graphs[key] for key in graphs)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason=NEEDS_CUDA_GRAPHS)
def test_each_projection_setting_replays_its_own_graphs(tokenizer):
    model = build("qwen2", tokenizer)
    gen = HFStepGenerator.from_model(model, tokenizer, decode="graphs")
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    requests = [StepRequest(f"k{i}", gen.encode(PROMPTS[i]), 10) for i in range(3)]

    def run(generator):
        outputs = generator.generate_steps(requests, StepParams(delimiter=""))
        generator.release([r.key for r in requests])
        return [o.token_ids for o in outputs]

    want = run(eager)
    assert run(gen) == want
    fused = dict(gen.static_decoder._graphs)
    gen.static_decoder.fuse_projections = False
    assert run(gen) == want
    assert len(gen.static_decoder._graphs) == 2 * len(fused)  # the same shapes, captured once more
    gen.static_decoder.fuse_projections = True
    assert run(gen) == want
    assert all(gen.static_decoder._graphs[key] is graph for key, graph in fused.items())


def test_unsupported_models_say_why_and_auto_falls_back(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            sliding_window=16,
        )
    )
    assert "sliding-window" in static_decode_problem(sliding)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert "'gpt2' is not one of" in static_decode_problem(gpt2)
    with pytest.raises(RSDError, match="decode='static' cannot run MistralForCausalLM: .*sliding-window.*'eager'"):
        resolve_decode_mode("static", sliding, "cpu")
    assert resolve_decode_mode("auto", sliding, "cuda") == "eager"
    assert resolve_decode_mode("auto", gpt2, "cuda") == "eager"


def test_auto_keeps_the_cpu_on_transformers_and_checks_its_inputs(tokenizer, monkeypatch):
    model = build("qwen2", tokenizer).cpu()
    monkeypatch.delenv(DECODE_ENV, raising=False)
    assert resolve_decode_mode("auto", model, "cpu") == "eager"
    assert resolve_decode_mode("auto", model, "cuda:0") == "graphs"
    with pytest.raises(RSDError, match="decode='graphs' needs a CUDA device, not cpu"):
        resolve_decode_mode("graphs", model, "cpu")
    with pytest.raises(RSDError, match="decode='fast' is not one of auto, eager, static, graphs"):
        resolve_decode_mode("fast", model, "cpu")
    monkeypatch.setenv(DECODE_ENV, "static")
    assert resolve_decode_mode("auto", model, "cpu") == "static"
    monkeypatch.setenv(DECODE_ENV, "quick")
    with pytest.raises(RSDError, match="RSD_DECODE='quick' is not one of eager, static, graphs"):
        resolve_decode_mode("auto", model, "cpu")


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the fallback where a CUDA graph cannot be captured: runs on a machine without CUDA",
)
def test_a_failed_capture_warns_once_and_decodes_without_graphs(tokenizer):
    from rsd.backends.static_decode import StaticDecoder

    model = build("qwen2", tokenizer).cpu()
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    fast = HFStepGenerator.from_model(model, tokenizer, decode="static")
    fast._static = StaticDecoder(model, use_graphs=True)  # as on a GPU; capturing fails here, with no CUDA
    requests = [StepRequest(f"f{i}", fast.encode(text), 6) for i, text in enumerate(PROMPTS[:3])]
    with pytest.warns(UserWarning, match="CUDA graph capture failed .* decodes without graphs"):
        got = fast.generate_steps(requests, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager.generate_steps(requests, GREEDY)]
    assert fast._static.use_graphs is False


def storage_bytes(model) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_fused_projections_share_the_models_weights_and_change_no_forward(tokenizer, kind):
    model = build(kind, tokenizer)
    ids = torch.tensor([tokenizer.encode(PROMPTS[2])], device=DEVICE)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    held = storage_bytes(model)
    first = StaticDecoder(model, use_graphs=False)
    second = StaticDecoder(model, use_graphs=False)  # a second decoder of the same model fuses nothing again
    assert first._projections is not None
    for layer, a, b in zip(model.model.layers, first._projections, second._projections, strict=True):
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
    # Weights changed in place reach the decoder: they are the same memory.
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    gate_up = first._projections[1].gate_up
    assert torch.equal(gate_up[gate_up.shape[0] // 2 :], model.model.layers[1].mlp.up_proj.weight)


def test_biased_projections_fuse_with_their_biases(tokenizer):
    model = build("llama", tokenizer, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in (layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                module.bias.uniform_(-1.0, 1.0)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    want = trajectories(eager, [3, 7, 5, 2, 9], steps=2)
    fast = HFStepGenerator.from_model(model, tokenizer, decode="static")
    assert fast._static._projections[0].gate_up_bias is not None
    assert trajectories(fast, [3, 7, 5, 2, 9], steps=2) == want


def test_a_hooked_or_replaced_projection_keeps_the_model_unfused(tokenizer):
    model = build("qwen2", tokenizer)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    want = trajectories(eager, [4, 6, 3, 8, 5], steps=2)
    seen = []
    model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda module, args, out: seen.append(1))
    weight = model.model.layers[0].self_attn.q_proj.weight
    fast = HFStepGenerator.from_model(model, tokenizer, decode="static")
    assert fast._static._projections is None  # a direct product would skip the hook
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # and nothing was re-pointed
    assert trajectories(fast, [4, 6, 3, 8, 5], steps=2) == want
    assert seen  # the hook ran in the decode forward too
