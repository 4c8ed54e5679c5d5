"""rsd's Triton kernels (`rsd.engine.kernels`): the split decode attention against SDPA on the same arena views, the
packed attention against each token alone, the layer kernels against the torch operations they replace, and the
engine with them against its torch path. Without a CUDA GPU they run through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), in float32; with one, the same tests run them compiled on "cuda"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_engine import (  # noqa: E402
    PROMPTS,
    assert_rows_leave_the_batch_alike,
    build,
    engine_generator,
    ids_of,
    trajectories,
)
from tiny import make_tokenizer  # noqa: E402

from rsd.core import StepParams, StepRequest  # noqa: E402
from rsd.engine import forward as engine_forward  # noqa: E402
from rsd.engine.forward import Feed, ModelForward, packed_chunks, rms_norm, rotate, signed_sin  # noqa: E402
from rsd.engine.kernels import decode_matmul as products  # noqa: E402
from rsd.engine.kernels import layer_kernels as kernels  # noqa: E402
from rsd.engine.kernels import packed_attention as packed  # noqa: E402
from rsd.engine.kernels import split_attention as split  # noqa: E402
from rsd.engine.kernels.packed_attention import tile_tokens  # noqa: E402
from rsd.engine.kv_cache import Arena  # noqa: E402
from rsd.engine.runner import ModelRunner  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' brings it")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def on(device) -> str:
    """The device the kernels run on: the CPU through Triton's interpreter, or a CUDA GPU compiled."""
    if device == "cpu" and not split.interpreting():
        pytest.skip("with a CUDA GPU present the kernels run compiled (conftest.py leaves TRITON_INTERPRET unset)")
    return device


def with_kernels(model) -> ModelRunner:
    """A runner of `model` with rsd's Triton kernels on (the default for half precision on CUDA; float32 here)."""
    runner = ModelRunner(model)
    assert runner.forward.kernels_problem() is None
    runner.forward.kernels = True
    return runner


def arena_views(rows: int, kv_heads: int, groups: int, head_dim: int, width: int, device, dtype=torch.float32):
    """Query, keys and values laid out as the engine's are: the keys and values a column slice of a wider arena,
    the query a strided view into one projection's output."""
    generator = torch.Generator().manual_seed(rows * 1000 + width)
    arena = torch.randn((2, rows + 1, kv_heads, width + 70, head_dim), generator=generator).to(device, dtype)
    keys, values = arena[0, :rows, :, :width], arena[1, :rows, :, :width]
    projected = torch.randn((rows, (kv_heads * groups + 2 * kv_heads), head_dim), generator=generator)
    query = projected.to(device, dtype)[:, : kv_heads * groups].reshape(rows, kv_heads, groups, head_dim)
    return query, keys, values


def sdpa_reference(query, keys, values, mask, scale):
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -1e30)
    out = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), bias[:, None, None], scale=scale)
    return out


@pytest.mark.parametrize(
    "rows, kv_heads, groups, head_dim, width",
    [(1, 2, 6, 64, 768), (3, 2, 7, 32, 300), (5, 1, 1, 16, 5), (2, 4, 3, 128, 130)],
    ids=["one-row-many-chunks", "ragged-width", "one-column-block", "head-dim-128"],
)
def test_split_kernels_equal_sdpa_over_masked_arena_columns(rows, kv_heads, groups, head_dim, width, on):
    query, keys, values = arena_views(rows, kv_heads, groups, head_dim, width, on)
    generator = torch.Generator().manual_seed(width)
    mask = (torch.rand((rows, width), generator=generator) < 0.5).to(on)
    mask[:, -1] = True  # the column a decode token writes: every row sees it
    mask[0, :-1] = False  # a row that sees only that column: every chunk but the last sees nothing
    out = split.split_attention(query, keys, values, mask, scale=0.7)
    assert out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), sdpa_reference(query, keys, values, mask, 0.7), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[0].float(), values[0, :, -1:].float().expand_as(out[0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton's interpreter has no bfloat16")
def test_split_kernels_in_bfloat16_stay_within_its_rounding():
    query, keys, values = arena_views(4, 2, 6, 64, 520, "cuda", dtype=torch.bfloat16)
    mask = torch.ones((4, 520), dtype=torch.bool, device="cuda")
    mask[1, :200] = False
    out = split.split_attention(query, keys, values, mask, scale=0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sdpa_reference(query, keys, values, mask, 0.125), atol=2e-2, rtol=2e-2)


def test_chunks_fill_the_card_but_never_split_a_column_block():
    h200 = 132
    assert split.split_count(pairs=2, width=768, sms=h200) == 12  # one block of 64 columns per chunk
    assert split.split_count(pairs=2, width=4096, sms=h200) == split.MAX_SPLITS  # the merge's limit
    assert split.split_count(pairs=128, width=768, sms=h200) == 3  # 384 programs: about 2 per SM
    assert split.split_count(pairs=2, width=100, sms=h200) == 2
    assert split.split_count(pairs=512, width=768, sms=h200) == 1


def test_problems_name_why_and_the_engine_takes_the_kernels_only_where_they_pay(tokenizer, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in split.split_attention_problem(cpu, torch.float32, 64)
    model = build("qwen2", tokenizer)
    assert "its kernels run on CUDA devices, not cpu" in ModelForward(model).kernels_problem()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert split.split_attention_problem(cpu, torch.float32, 64) is None
    assert "power of two" in split.split_attention_problem(cpu, torch.float32, 80)
    assert "float64" in split.split_attention_problem(cpu, torch.float64, 64)
    # They could run (through the interpreter), but the engine takes them by default only on CUDA in half precision.
    for dtype in (torch.float32, torch.bfloat16):
        forward = ModelForward(build("qwen2", tokenizer).to(dtype))
        assert forward.kernels_problem() is None and forward.kernels is False


def test_dependent_launches_run_only_where_the_card_and_triton_have_them(monkeypatch):
    cpu = torch.device("cpu")
    split.dependent_launches.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not split.dependent_launches(cpu)
    assert split.launch_options(cpu) == {"PDL": False}  # the interpreter never sees Triton's launch option
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not split.dependent_launches(cpu)
    split.dependent_launches.cache_clear()


def test_rotation_kernel_writes_each_decode_token_at_its_rows_column(on):
    """A decode forward: token i is arena row i, written at its own column `columns[i]` (rows stand at different
    columns: their prefixes and what they fed differ)."""
    heads, kv_heads, head_dim, rows, width = 6, 2, 32, 3, 70
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn((rows, (heads + 2 * kv_heads) * head_dim), generator=generator).to(on)
    angles = torch.randn((rows, head_dim // 2), generator=generator).repeat(1, 2).to(on)
    cos, sin = angles.cos(), signed_sin(angles.sin())
    arena = torch.zeros((2, rows + 1, kv_heads, width + 10, head_dim), device=on)
    keys, values = arena[0, :rows, :, :width], arena[1, :rows, :, :width]
    columns = [41, 7, 63]
    query = kernels.rotate_into_arena(qkv, cos, sin, keys, values, torch.tensor(columns, device=on), heads, kv_heads)
    heads_in = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    want = rotate(heads_in[:, : heads + kv_heads], cos[:, None], sin[:, None])
    torch.testing.assert_close(query.reshape(rows, heads, head_dim), want[:, :heads], atol=1e-6, rtol=1e-6)
    written = torch.zeros(arena.shape[:4], dtype=torch.bool, device=on)
    for row, column in enumerate(columns):
        torch.testing.assert_close(keys[row, :, column], want[row, heads:], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(values[row, :, column], heads_in[row, heads + kv_heads :])
        written[:, row, :, column] = True
    assert not arena[~written].any()  # nothing else: no other row, column or the wider arena's rest


def test_rotation_kernel_writes_each_packed_token_at_its_slot_and_column(on):
    """A packed forward: each token names its arena row and column (several tokens a row, rows in any order)."""
    heads, kv_heads, head_dim, rows, width = 4, 2, 16, 3, 60
    slots, columns = [2, 2, 0, 1, 2], [10, 11, 3, 50, 12]
    tokens = len(slots)
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn((tokens, (heads + 2 * kv_heads) * head_dim), generator=generator).to(on)
    angles = torch.randn((tokens, head_dim // 2), generator=generator).repeat(1, 2).to(on)
    cos, sin = angles.cos(), signed_sin(angles.sin())
    arena = torch.zeros((2, rows, kv_heads, width, head_dim), device=on)
    keys, values = arena[0], arena[1]
    query = kernels.rotate_into_arena(
        qkv, cos, sin, keys, values, torch.tensor(columns, device=on), heads, kv_heads, torch.tensor(slots, device=on)
    )
    heads_in = qkv.view(tokens, heads + 2 * kv_heads, head_dim)
    want = rotate(heads_in[:, : heads + kv_heads], cos[:, None], sin[:, None])
    torch.testing.assert_close(query.reshape(tokens, heads, head_dim), want[:, :heads], atol=1e-6, rtol=1e-6)
    written = torch.zeros(arena.shape[:4], dtype=torch.bool, device=on)
    for token, (slot, column) in enumerate(zip(slots, columns, strict=True)):
        torch.testing.assert_close(keys[slot, :, column], want[token, heads:], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(values[slot, :, column], heads_in[token, heads + kv_heads :])
        written[:, slot, :, column] = True
    assert not arena[~written].any()


def test_add_and_norm_kernel_and_silu_kernel_equal_the_modules(tokenizer, on):
    model = build("qwen2", tokenizer, on)
    layer = model.model.layers[0]
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn((5, 64), generator=generator).to(on)
    update = torch.randn((5, 64), generator=generator).to(on)
    norm = layer.post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        want_hidden = hidden + update
        want = norm(want_hidden)
        summed, normed = kernels.add_rms_norm(hidden.clone(), update, norm.weight, norm.variance_epsilon)
        torch.testing.assert_close(summed, want_hidden)
        torch.testing.assert_close(normed, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed, rms_norm(norm, want_hidden), atol=1e-5, rtol=1e-5)
        alone = kernels.rms_norm_rows(want_hidden, norm.weight, norm.variance_epsilon)  # the body's final norm
        torch.testing.assert_close(alone, want, atol=1e-5, rtol=1e-5)
        gate_up = torch.randn((3, 2 * 1500), generator=generator).to(on)  # more than one block of 1024
        mlp = layer.mlp
        want = mlp.act_fn(gate_up[:, :1500]) * gate_up[:, 1500:]
        torch.testing.assert_close(kernels.silu_times_up(gate_up), want, atol=1e-6, rtol=1e-6)


def module_rounded_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: in float32, the normalised row cast to x's dtype before the weight."""
    v = x.float()
    return weight * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_decode_products_equal_the_operations_they_carry(rows, splits, on, monkeypatch):
    """The norm before a product, the SiLU gate before it and the residual add after it, with the inner dimension
    whole or split (3: uneven runs of inner blocks; 4: the last split has none); the arrival counts left zero."""
    generator = torch.Generator().manual_seed(rows * 10 + splits)
    features, inner = 40, 160  # three blocks of 16 features, the last one short; five inner blocks of 32

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(on)

    x, weight, bias = randn(rows, inner), randn(features, inner) / inner**0.5, randn(features)
    norm_weight, gate_up, stream = randn(inner).abs() + 0.5, randn(rows, 2 * inner), randn(rows, features)
    plan = products.LaunchPlan(16, 16, 32, splits, warps=4, stages=2)
    monkeypatch.setattr(products, "launch_plan", lambda *shape, normed: plan)
    counters = products.new_counters(torch.device(on))
    normed = products.decode_linear(x, weight, bias, norm=(norm_weight, 1e-6), counters=counters)
    want = F.linear(module_rounded_norm(x, norm_weight, 1e-6), weight, bias)
    torch.testing.assert_close(normed, want, atol=1e-5, rtol=1e-5)
    added = products.decode_linear(gate_up, weight, gated=True, residual=stream.clone(), counters=counters)
    want = stream + F.linear(F.silu(gate_up[:, :inner]) * gate_up[:, inner:], weight)
    torch.testing.assert_close(added, want, atol=1e-5, rtol=1e-5)
    plain = products.decode_linear(x, weight, counters=counters)
    torch.testing.assert_close(plain, x @ weight.T, atol=1e-5, rtol=1e-5)
    assert not counters.any()  # every launch leaves them zero: the next launch (a graph's replay) counts afresh


def test_decode_product_plans_fill_the_card_and_split_long_inner_runs():
    h100 = 132
    plan = products.launch_plan  # (rows, features, inner, sms, normed): a 1.5B model's products at 16 rows
    assert plan(16, 2048, 1536, h100, normed=True)[1:4] == (128, 128, 4)  # q/k/v: 16 blocks, 4 ways: 64 programs
    assert plan(16, 17920, 1536, h100, normed=True)[1:4] == (128, 128, 1)  # gate/up: 140 blocks fill the card
    assert plan(16, 1536, 1536, h100, normed=False)[1:4] == (64, 128, 4)  # output: 24 blocks, 4 ways
    assert plan(16, 1536, 8960, h100, normed=False)[1:4] == (64, 128, 8)  # down: runs of at most 1536 columns
    assert [plan(rows, 2048, 1536, h100, normed=True).block_rows for rows in (1, 5, 16)] == [16, 16, 16]
    assert plan(1, 64, 160, 8, normed=False).splits == 1  # too short to split in whole blocks
    assert products.decode_products_problem(1536) is None
    assert "5120" in products.decode_products_problem(5120)
    with pytest.raises(ValueError, match="17 rows"):
        products.decode_linear(torch.zeros(17, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="columns"):
        products.decode_linear(torch.zeros(2, 8), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="row-major"):
        products.decode_linear(torch.zeros(8, 2).T, torch.zeros(4, 8))


def test_layer_kernels_say_why_a_model_cannot_use_them(tokenizer, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the layout's problems, not the device's (these models are on the CPU)
    assert "normalises each head" in ModelForward(build("qwen3", tokenizer)).kernels_problem()
    assert "activation is" in ModelForward(build("qwen2", tokenizer, hidden_act="gelu")).kernels_problem()
    assert ModelForward(build("llama", tokenizer)).kernels_problem() is None
    hooked = build("qwen2", tokenizer)
    hooked.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda module, args: None)
    assert "its projections are not fused" in ModelForward(hooked).kernels_problem()
    # A hooked output projection keeps the fused layer kernels but not the products that carry them.
    hooked = build("qwen2", tokenizer)
    hooked.model.layers[1].self_attn.o_proj.register_forward_hook(lambda module, args, out: None)
    forward = ModelForward(hooked)
    assert forward.kernels_problem() is None and not forward.fused_products
    assert ModelForward(build("qwen2", tokenizer)).fused_products
    assert not ModelForward(build("qwen2", tokenizer, hidden_size=2560)).fused_products  # cuBLAS is as fast there


@pytest.mark.slow  # about 2 minutes through Triton's interpreter
def test_the_engine_with_its_kernels_decodes_what_its_torch_path_decodes(tokenizer, on):
    """As on a GPU in half precision: packed prefills, split decode attention and the layer kernels. Qwen2 (Llama's
    layers run the same kernels, without the projections' biases; Qwen3's per-head norms keep it off them)."""
    model = build("qwen2", tokenizer, on)
    plain = engine_generator(model, tokenizer)
    fast = engine_generator(model, tokenizer)
    fast.engine.runner = with_kernels(model)
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=2) == trajectories(plain, caps, steps=2)
    assert_rows_leave_the_batch_alike(fast, plain)
    forward = fast.engine.runner.forward
    assert forward.kernels and forward.packed_checked and forward.decode_checked  # they ran throughout: no fallback


def test_a_verification_through_the_kernels_equals_the_torch_path(tokenizer, on):
    """What token-level speculation does with a runner: proposed tokens, several a row, in one packed forward; the
    rejected ones rolled back; other tokens fed after the kept ones; then a decode token. Every logit through the
    kernels is what the torch path gives."""
    model = build("qwen2", tokenizer, on)
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]
    proposals = [tokenizer.encode(" 3 + 4 = 7"), tokenizer.encode(" x = 6"), []]
    kept = [2, 0, 0]
    others = [tokenizer.encode(" 12"), [], tokenizer.encode(" So")]
    results = []
    for runner in (with_kernels(model), ModelRunner(model)):
        with torch.inference_mode():
            first = runner.open([None] * 3, prompts, room=16).clone()
            proposed = runner.extend(proposals).clone()
            runner.rollback([len(p) - k for p, k in zip(proposals, kept, strict=True)])
            fed = runner.extend(others).clone()
            step = runner.decode(ids_of([5, 6, 7], runner.slots, on))[:3].clone()
        results.append((first, proposed, fed, step))
        if len(results) == 1:
            forward = runner.forward
            assert forward.kernels and forward.packed_checked and forward.decode_checked  # no fallback
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bare_body", [False, True])
def test_a_short_open_fed_as_a_padded_verification_equals_an_eager_prefill(tokenizer, on, bare_body):
    """What a graphed open runs (`ModelRunner._feed_padded`, here without the graph): ragged tails padded to a
    power of two and fed as one verification whose rows span several attention tiles (the tiny model's tile is 64
    tokens), the padding rolled back, only each row's last token read out, for a causal LM and for a bare body.
    Its output, the keys and values it leaves and the next decode token equal an eager prefill's."""
    model = build("qwen2", tokenizer, on)
    network = model.model if bare_body else model
    long_text = tokenizer.encode(" 3 + 4 = 7 and 12 - 5 = 7 ," * 8)
    tails = [long_text[:70], long_text[:66], long_text[:100]]
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]
    fed = 128
    assert tile_tokens(2) < max(map(len, tails)) <= fed  # several tiles a row

    def runner() -> ModelRunner:
        made = ModelRunner(network, body=network) if bare_body else ModelRunner(network)
        made.forward.kernels = made.forward.packed_checked = True
        return made

    results = []
    for padded in (True, False):
        made = runner()
        with torch.inference_mode():
            made.open([None] * 3, prompts, room=fed + 8)
            caches = [made.row_cache(slot, prompt).kv for slot, prompt in enumerate(prompts)]
            made.arena.open(caches, fed + 8)
            opened = made._feed_padded(tails, fed) if padded else made.extend(tails, [1] * len(tails))
            out = opened.clone()
            kv = [made.row_cache(slot, p + t).kv for slot, (p, t) in enumerate(zip(prompts, tails, strict=True))]
            step = made.decode(ids_of([5, 6, 7], made.slots, on))[:3].clone()
        results.append((out, *kv, step))
    assert results[0][0].shape[0] == len(tails)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- packed forwards: every row's tokens after the previous row's, no padding ----------------------------------------


def test_packed_chunks_place_every_token_and_never_let_a_tile_or_chunk_cross_a_row_or_limit(monkeypatch):
    # Rows of 5, 1 and 7 tokens after 3, 0 and 6 cached ones (prefixes right-aligned before column 6, tails from
    # column 6 on), in chunks of at most 6 tokens and tiles of at most 4.
    arena = Arena(layers=1, kv_heads=1, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    arena.open([torch.zeros((1, 2, 1, past, 16)) if past else None for past in (3, 0, 6)], room=8)
    tokens = [[1] * 5, [2], [3] * 7]
    feed = Feed.placed(arena, [len(t) for t in tokens], [t for row in tokens for t in row])
    assert feed.positions == [3, 4, 5, 6, 7] + [0] + [6, 7, 8, 9, 10, 11, 12]
    assert feed.slots == [0] * 5 + [1] + [2] * 7
    assert feed.columns == list(range(6, 11)) + [6] + list(range(6, 13))
    assert feed.rows == [(0, 0, 5), (1, 5, 1), (2, 6, 7)] and feed.kept_tokens([1, 1, 1]) == [4, 5, 12]
    assert arena.lo == [3, 6, 0, 6] and arena.next == [11, 7, 13, 6]
    monkeypatch.setattr(engine_forward, "PACKED_CHUNK_TOKENS", 6)
    chunks = packed_chunks(feed, arena.lo, 4, feed.kept_tokens([1, 1, 1]))
    assert [(first, end) for first, end, _, _ in chunks] == [(0, 6), (6, 12), (12, 13)]
    # [arena row, first token in the chunk, tokens, first real column, last token's column + 1]
    assert [tiles for _, _, tiles, _ in chunks] == [
        [[0, 0, 4, 3, 10], [0, 4, 1, 3, 11], [1, 5, 1, 6, 7]],
        [[2, 0, 4, 0, 10], [2, 4, 2, 0, 12]],
        [[2, 0, 1, 0, 13]],
    ]
    # (output row, token within the chunk) of each row's last token
    assert [kept for _, _, _, kept in chunks] == [[(0, 4), (1, 5)], [], [(2, 0)]]


def packed_reference(query, keys, values, mask, feed, scale):
    """Each token alone through SDPA: its row's real columns up to its own."""
    heads, groups = query.shape[1], query.shape[1] // keys.shape[1]
    out = []
    for token, (slot, column) in enumerate(zip(feed.slots, feed.columns, strict=True)):
        seen = mask[slot].clone()
        seen[column + 1 :] = False
        k = keys[slot].repeat_interleave(groups, 0).float()  # [heads, width, head_dim]
        v = values[slot].repeat_interleave(groups, 0).float()
        bias = torch.zeros(seen.shape, device=seen.device).masked_fill(~seen, -1e30)
        q = query[token].float()[:, None]  # [heads, 1, head_dim]
        out.append(F.scaled_dot_product_attention(q, k, v, bias[None, None], scale=scale)[:, 0])
    assert out[0].shape[0] == heads
    return torch.stack(out)


@pytest.mark.parametrize(
    "kv_heads, groups, head_dim, lengths, reused",
    [(2, 6, 32, [5, 1, 40, 17], [3, 0, 20, 9]), (1, 7, 16, [9, 2], [0, 30]), (2, 1, 64, [70, 3], [5, 1])],
    ids=["draft-like-groups-6", "target-like-groups-7", "one-query-head-per-key-head"],
)
def test_packed_attention_equals_each_token_alone_over_its_rows_columns(
    kv_heads, groups, head_dim, lengths, reused, on
):
    """Rows in arena slots 1.. (slot 0 idle), their tails at their own columns, holes in their prefixes' mask."""
    rows, width, start = len(lengths) + 1, 128, 40
    feed = Feed()
    lo = [start] * rows
    for row, (length, past) in enumerate(zip(lengths, reused, strict=True)):
        feed.rows.append((row + 1, len(feed.slots), length))
        feed.ids += [0] * length
        feed.slots += [row + 1] * length
        feed.columns += range(start, start + length)
        lo[row + 1] = start - past
    ((_, _, tiles, _),) = packed_chunks(feed, lo, 4, keep=[])
    generator = torch.Generator().manual_seed(sum(lengths))
    arena = torch.randn((2, rows, kv_heads, width + 30, head_dim), generator=generator).to(on)
    keys, values = arena[0, :, :, :width], arena[1, :, :, :width]  # column slices of a wider arena
    mask = torch.zeros((rows, width), dtype=torch.bool)
    for row, (length, past) in enumerate(zip(lengths, reused, strict=True)):
        mask[row + 1, start - past : start] = torch.rand(past, generator=generator) < 0.8  # holes in the prefix
        mask[row + 1, start : start + length] = True
    mask = mask.to(on)
    query = torch.randn((len(feed.slots), kv_heads * groups, head_dim), generator=generator).to(on)
    columns = torch.tensor(feed.columns, device=on)
    table = torch.tensor(tiles, dtype=torch.int32, device=on)
    out = packed.packed_attention(query, keys, values, mask, columns, table, scale=0.3)
    assert out.shape == query.shape
    torch.testing.assert_close(out, packed_reference(query, keys, values, mask, feed, 0.3), atol=2e-5, rtol=2e-5)


def test_a_packed_forward_in_chunks_computes_what_an_unchunked_one_computes(tokenizer, on, monkeypatch):
    """Logits of every fed token and every key and value written: the same with the tokens in chunks of 5 (rows
    cross chunks), in one chunk, and through torch operations, all in float32 over the same prefixes."""
    model = build("qwen2", tokenizer, on)
    tails = [[5, 9, 14, 3, 8, 20, 11], [7], [30, 2, 6, 12]]
    more = [[4, 4], [], [9, 1, 3]]  # a second forward after the prefill: several tokens on some rows
    shape = (model.config.num_hidden_layers, 2, model.config.num_key_value_heads, 0, 16)
    prefixes = [
        torch.randn(shape[:3] + (past,) + shape[4:], generator=torch.Generator().manual_seed(past)).to(on)
        for past in (4, 0, 9)
    ]
    counted = []

    def counting(*args, **kwargs):
        chunks = packed_chunks(*args, **kwargs)
        counted.append(len(chunks))
        return chunks

    monkeypatch.setattr(engine_forward, "packed_chunks", counting)
    results = []
    for chunk_tokens, kernels_on in ((5, True), (10**6, True), (5, False)):
        monkeypatch.setattr(engine_forward, "PACKED_CHUNK_TOKENS", chunk_tokens)
        runner = with_kernels(model) if kernels_on else ModelRunner(model)
        with torch.inference_mode():
            last = runner.open([p if p.shape[3] else None for p in prefixes], tails, room=4)
            every = runner.extend(more)
        arena = runner.arena
        kv = [arena.kv[:, :, slot, :, arena.lo[slot] : arena.next[slot]].clone() for slot in range(3)]
        results.append((last, every, kv, arena.position[:3]))
        assert runner.forward.kernels is kernels_on  # no fallback
    assert counted == [3, 1, 1, 1]  # 12 tokens in chunks of 5, then 5 tokens; then each in one chunk
    (last, every, kv, positions), *others = results
    assert positions == [13, 1, 16]
    for other_last, other_every, other_kv, other_positions in others:
        assert other_positions == positions
        torch.testing.assert_close(other_last, last, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(other_every, every, atol=1e-4, rtol=1e-4)
        for got, want in zip(other_kv, kv, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- kernels that fail ------------------------------------------------------------------------------------------


def no_toolchain():
    raise RuntimeError("ptxas not found")


KERNEL_SOURCES = {
    "all": ((split, "compiled_kernels"), (kernels, "compiled_kernels"), (packed, "compiled_kernel")),
    "decode-attention": ((split, "compiled_kernels"),),  # the prefills' kernels compile, a decode's do not
    "packed-attention": ((packed, "compiled_kernel"),),  # the decode tokens' kernels would compile
}


@pytest.mark.parametrize("failing", list(KERNEL_SOURCES))
def test_kernels_that_fail_warn_once_and_decoding_goes_on_without_them(tokenizer, failing, on, monkeypatch):
    model = build("qwen2", tokenizer, on)
    plain = engine_generator(model, tokenizer)
    gen = engine_generator(model, tokenizer)
    gen.engine.runner = with_kernels(model)
    for module, name in KERNEL_SOURCES[failing]:
        monkeypatch.setattr(module, name, no_toolchain)
    message = r"rsd's Triton kernels failed \(RuntimeError: ptxas not found\); this model runs with SDPA and torch"
    with pytest.warns(UserWarning, match=message) as seen:
        got = trajectories(gen, [4, 6, 3, 5, 2], steps=2)
    assert len([w for w in seen if "Triton" in str(w.message)]) == 1
    assert gen.engine.runner.forward.kernels is False
    assert got == trajectories(plain, [4, 6, 3, 5, 2], steps=2)
    requests = [StepRequest(f"n{i}", gen.encode(text), 3) for i, text in enumerate(PROMPTS)]
    no_delimiter = StepParams(delimiter="")
    assert [o.token_ids for o in gen.generate_steps(requests, no_delimiter)] == [
        o.token_ids for o in plain.generate_steps(requests, no_delimiter)
    ]
