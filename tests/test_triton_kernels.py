"""rsd's Triton kernels for the static decode forward: the split decode attention (`split_attention`) against SDPA
on the same arena views, the layer kernels (`layer_kernels`) against the torch operations they replace, and the
static decode path with them against transformers' forward. Off CUDA they run through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py); on CUDA (RSD_TEST_DEVICE=cuda) the same tests run them compiled."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rsd.backends.prefill_attention import packed_attention  # noqa: E402
from rsd.backends.static_decode import StaticDecoder, rms_norm, rotate, signed_sin  # noqa: E402
from test_static_decode import assert_rows_leave_the_batch_alike, build, trajectories  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

from rsd.backends import layer_kernels as kernels  # noqa: E402
from rsd.backends import split_attention as split  # noqa: E402
from rsd.backends import static_decode  # noqa: E402
from rsd.backends.hf import HFStepGenerator  # noqa: E402
from rsd.core import RSDError  # noqa: E402

DEVICE = os.environ.get("RSD_TEST_DEVICE", "cpu")
pytest.importorskip("triton", reason="Triton is not installed: pip install -e '.[dev]' brings it")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def arena_views(rows: int, kv_heads: int, groups: int, head_dim: int, width: int, dtype=torch.float32):
    """Query, keys and values laid out as the static decoder's are: the keys and values a column slice of a wider
    arena, the query a strided view into one projection's output."""
    generator = torch.Generator().manual_seed(rows * 1000 + width)
    arena = torch.randn((2, rows + 1, kv_heads, width + 70, head_dim), generator=generator).to(DEVICE, dtype)
    keys, values = arena[0, :rows, :, :width], arena[1, :rows, :, :width]
    projected = torch.randn((rows, (kv_heads * groups + 2 * kv_heads), head_dim), generator=generator)
    query = projected.to(DEVICE, dtype)[:, : kv_heads * groups].reshape(rows, kv_heads, groups, head_dim)
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
def test_split_kernels_equal_sdpa_over_masked_arena_columns(rows, kv_heads, groups, head_dim, width):
    query, keys, values = arena_views(rows, kv_heads, groups, head_dim, width)
    generator = torch.Generator().manual_seed(width)
    mask = (torch.rand((rows, width), generator=generator) < 0.5).to(DEVICE)
    mask[:, -1] = True  # the column a decode token writes: every row sees it
    mask[0, :-1] = False  # a row that sees only that column: every chunk but the last sees nothing
    out = split.split_attention(query, keys, values, mask, scale=0.7)
    assert out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), sdpa_reference(query, keys, values, mask, 0.7), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[0].float(), values[0, :, -1:].float().expand_as(out[0]))


@pytest.mark.skipif(
    not DEVICE.startswith("cuda"),
    reason="Triton's interpreter has no bfloat16 (numpy has none): run with RSD_TEST_DEVICE=cuda on a GPU",
)
def test_split_kernels_in_bfloat16_stay_within_its_rounding():
    query, keys, values = arena_views(4, 2, 6, 64, 520, dtype=torch.bfloat16)
    mask = torch.ones((4, 520), dtype=torch.bool, device=DEVICE)
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


def test_problems_name_why_and_the_decoder_refuses_what_cannot_run(tokenizer, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in split.split_attention_problem(cpu, torch.float32, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert split.split_attention_problem(cpu, torch.float32, 64) is None
    assert "power of two" in split.split_attention_problem(cpu, torch.float32, 80)
    assert "float64" in split.split_attention_problem(cpu, torch.float64, 64)
    static = StaticDecoder(build("qwen2", tokenizer), use_graphs=False)
    with pytest.raises(RSDError, match="unknown decode attention 'flash'"):
        static.attention = "flash"
    if not DEVICE.startswith("cuda"):
        assert static.attention == "sdpa"  # the default off CUDA
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RSDError, match="cannot run here: its kernels run on CUDA devices.*use 'sdpa'"):
            static.attention = "split"


def test_rotation_kernel_writes_the_rotated_key_and_the_value_at_the_arena_column():
    heads, kv_heads, head_dim, rows, width = 6, 2, 32, 3, 70
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn((rows, (heads + 2 * kv_heads) * head_dim), generator=generator).to(DEVICE)
    angles = torch.randn((rows, head_dim // 2), generator=generator).repeat(1, 2).to(DEVICE)
    cos, sin = angles.cos(), signed_sin(angles.sin())
    arena = torch.zeros((2, rows + 1, kv_heads, width + 10, head_dim), device=DEVICE)
    keys, values = arena[0, :rows, :, :width], arena[1, :rows, :, :width]
    column = torch.tensor([41], device=DEVICE)
    query = kernels.rotate_into_arena(qkv, cos, sin, keys, values, column, heads, kv_heads)
    heads_in = qkv.view(rows, heads + 2 * kv_heads, head_dim)
    want = rotate(heads_in[:, : heads + kv_heads], cos[:, None], sin[:, None])
    torch.testing.assert_close(query.reshape(rows, heads, head_dim), want[:, :heads], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(keys[:, :, 41], want[:, heads:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values[:, :, 41], heads_in[:, heads + kv_heads :])
    untouched = torch.ones(width, dtype=torch.bool)
    untouched[41] = False
    assert not arena[:, :, :, untouched.nonzero()[:, 0]].any() and not arena[:, rows].any()


def test_add_and_norm_kernel_and_silu_kernel_equal_the_modules(tokenizer):
    model = build("qwen2", tokenizer)
    layer = model.model.layers[0]
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn((5, 64), generator=generator).to(DEVICE)
    update = torch.randn((5, 64), generator=generator).to(DEVICE)
    norm = layer.post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        want_hidden = hidden + update
        want = norm(want_hidden)
        summed, normed = kernels.add_rms_norm(hidden.clone(), update, norm.weight, norm.variance_epsilon)
        torch.testing.assert_close(summed, want_hidden)
        torch.testing.assert_close(normed, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed, rms_norm(norm, want_hidden), atol=1e-5, rtol=1e-5)
        gate_up = torch.randn((3, 2 * 1500), generator=generator).to(DEVICE)  # more than one block of 1024
        mlp = layer.mlp
        want = mlp.act_fn(gate_up[:, :1500]) * gate_up[:, 1500:]
        torch.testing.assert_close(kernels.silu_times_up(gate_up), want, atol=1e-6, rtol=1e-6)


def test_layer_kernels_say_why_a_model_cannot_use_them(tokenizer):
    qwen3 = StaticDecoder(build("qwen3", tokenizer), use_graphs=False)
    assert "normalises each head" in qwen3.layer_kernels_problem()
    with pytest.raises(RSDError, match="cannot run this model: its attention normalises each head.*= False"):
        qwen3.layer_kernels = True
    gelu = StaticDecoder(build("qwen2", tokenizer, hidden_act="gelu"), use_graphs=False)
    assert "activation is" in gelu.layer_kernels_problem()
    qwen2 = StaticDecoder(build("qwen2", tokenizer), use_graphs=False)
    assert qwen2.layer_kernels_problem() is None
    assert qwen2.layer_kernels is False  # float32 weights keep torch's operations by default, as on the CPU


@pytest.mark.parametrize(
    "kind, layer_kernels",
    [("qwen2", True), ("qwen3", False)],  # Llama's layers run the same kernels as Qwen2's (test_static_decode.py)
    ids=["qwen2-all-kernels", "qwen3-split-attention"],
)
def test_static_decoding_with_the_kernels_decodes_what_transformers_decodes(kind, layer_kernels, tokenizer):
    """As shipped on a GPU: the split attention, and the layer kernels where the layout allows them."""
    model = build(kind, tokenizer)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    fast = HFStepGenerator.from_model(model, tokenizer, decode="static")
    fast._static.attention = "split"
    fast._static.layer_kernels = layer_kernels
    caps = [2, 3, 9, 4, 12]
    assert trajectories(fast, caps, steps=2) == trajectories(eager, caps, steps=2)
    assert_rows_leave_the_batch_alike(fast, eager)


def test_kernels_that_fail_warn_once_and_decoding_goes_on_without_them(tokenizer, monkeypatch):
    def no_toolchain():
        raise RuntimeError("ptxas not found")

    model = build("qwen2", tokenizer)
    gen = HFStepGenerator.from_model(model, tokenizer, decode="static")
    gen._static.attention, gen._static.layer_kernels = "split", True
    monkeypatch.setattr(split, "compiled_kernels", no_toolchain)
    monkeypatch.setattr(kernels, "compiled_kernels", no_toolchain)
    eager = HFStepGenerator.from_model(model, tokenizer, decode="eager")
    with pytest.warns(UserWarning, match="Triton decode kernels failed.*ptxas not found.*SDPA and torch") as seen:
        got = trajectories(gen, [4, 6, 3, 5, 2], steps=2)
    assert len([w for w in seen if "Triton" in str(w.message)]) == 1
    assert (gen._static.attention, gen._static.layer_kernels) == ("sdpa", False)
    assert got == trajectories(eager, [4, 6, 3, 5, 2], steps=2)


# -- packed prefills: every row's tail after the previous row's, no padding ------------------------------------------


def test_packed_plan_places_every_token_and_never_lets_a_tile_or_chunk_cross_a_row_or_limit():
    # Rows of 5, 1 and 7 tokens after 3, 0 and 6 cached ones (prefixes right-aligned before column 10, tails in
    # columns 10..16), in chunks of at most 6 tokens and tiles of at most 4.
    plan = static_decode.packed_plan([5, 1, 7], [3, 0, 6], 2, (10, 17), chunk_tokens=6, tile=4)
    assert plan.positions == [3, 4, 5, 6, 7] + [0] + [6, 7, 8, 9, 10, 11, 12]
    assert plan.slots == [2] * 5 + [3] + [4] * 7
    assert plan.columns == list(range(12, 17)) + [16] + list(range(10, 17))
    assert [(c.first, c.end) for c in plan.chunks] == [(0, 6), (6, 12), (12, 13)]
    # [arena row, first token in the chunk, tokens, first real column, last token's column + 1]
    assert [c.tiles for c in plan.chunks] == [
        [[2, 0, 4, 7, 16], [2, 4, 1, 7, 17], [3, 5, 1, 16, 17]],
        [[4, 0, 4, 4, 14], [4, 4, 2, 4, 16]],
        [[4, 0, 1, 4, 17]],
    ]
    assert [(c.rows_ending, c.last_tokens) for c in plan.chunks] == [([0, 1], [4, 5]), ([], []), ([2], [0])]
    with pytest.raises(ValueError, match="row 1 has no token"):
        static_decode.packed_plan([2, 0], [0, 0], 0, (0, 2), 8, 4)


def packed_reference(query, keys, values, mask, plan, scale):
    """Each token alone through SDPA: its row's real columns up to its own."""
    heads, groups = query.shape[1], query.shape[1] // keys.shape[1]
    out = []
    for token, (slot, column) in enumerate(zip(plan.slots, plan.columns, strict=True)):
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
def test_packed_attention_equals_each_token_alone_over_its_rows_columns(kv_heads, groups, head_dim, lengths, reused):
    rows, width = len(lengths) + 1, 128
    start, end = 40, 40 + max(lengths)
    plan = static_decode.packed_plan(lengths, reused, 1, (start, end), chunk_tokens=10**6, tile=4)
    (chunk,) = plan.chunks
    generator = torch.Generator().manual_seed(sum(lengths))
    arena = torch.randn((2, rows, kv_heads, width + 30, head_dim), generator=generator).to(DEVICE)
    keys, values = arena[0, :, :, :width], arena[1, :, :, :width]  # column slices of a wider arena
    mask = torch.zeros((rows, width), dtype=torch.bool)
    for row, (length, past) in enumerate(zip(lengths, reused, strict=True)):
        mask[row + 1, start - past : start] = torch.rand(past, generator=generator) < 0.8  # holes in the prefix
        mask[row + 1, end - length : end] = True
    mask = mask.to(DEVICE)
    tokens = len(plan.slots)
    query = torch.randn((tokens, kv_heads * groups, head_dim), generator=generator).to(DEVICE)
    columns = torch.tensor(plan.columns, device=DEVICE)
    tiles = torch.tensor(chunk.tiles, dtype=torch.int32, device=DEVICE)
    out = packed_attention(query, keys, values, mask, columns, tiles, scale=0.3)
    assert out.shape == query.shape
    torch.testing.assert_close(out, packed_reference(query, keys, values, mask, plan, 0.3), atol=2e-5, rtol=2e-5)


def test_a_packed_prefill_in_chunks_computes_what_the_padded_prefill_computes(tokenizer):
    """Logits, every key and value written, positions: the same with the tails packed (in chunks of 5 tokens, so
    that rows cross chunks) as padded to the longest, both in float32 through the same arena."""
    model = build("qwen2", tokenizer)
    tails = [[5, 9, 14, 3, 8, 20, 11], [7], [30, 2, 6, 12]]
    reused = [4, 0, 9]
    results = []
    for packed in (False, True):
        static = StaticDecoder(model, use_graphs=False)
        static.attention, static.layer_kernels = "split", True
        static.pack_prefill, static.packed_prefill_tokens = packed, 5
        assert static.packed_prefill is packed
        shape = (static.layers, 2, static.shape.kv_heads, 0, static.shape.head_dim)
        prefixes = [torch.randn(shape[:3] + (past,) + shape[4:], generator=torch.Generator().manual_seed(past))
                    for past in reused]  # fmt: skip
        static.begin(prefixes, max(map(len, tails)), new_tokens=3)
        logits, columns = static.run_tails(0, tails, reused, pad_id=0)
        assert static.packed_prefill is packed  # the kernels ran: no fallback to the padded forward
        kv = [static.kv[:, :, slot, :, row_columns] for slot, row_columns in enumerate(columns)]
        results.append((logits, kv, static.positions[:3, 0].tolist(), columns))
    (logits, kv, positions, columns), (packed_logits, packed_kv, packed_positions, packed_columns) = results
    assert packed_columns == columns and packed_positions == positions == [11, 1, 13]
    torch.testing.assert_close(packed_logits, logits, atol=1e-4, rtol=1e-4)
    for got, want in zip(packed_kv, kv, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
