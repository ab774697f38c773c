"""The CUDA MoE kernels (csrc/moe/moe_cuda.cu) and their launch code, run on the CPU through
the emulation, in several block/thread orders: against the PyTorch reference and the C++
CPU kernels, on the cases of tests/ops/test_moe_ops.py and edge cases; the same errors as
the CPU kernels for bad input; device asserts raise."""
import pytest
import torch
from conftest import load_test_module

from steplaw.ops import moe as ops
from steplaw.ops._loader import has_kernel

pytestmark = pytest.mark.cuda_emu
moe_tests = load_test_module("ops/test_moe_ops.py")

# The CPU cases of tests/ops/test_moe_ops.py that fit the emulation's budget (those of 300
# and 20000 tokens take seconds per order: the fibers' context switches), and edge cases: E = 1, k = E, int64 ids, a
# scan over more experts than threads, counting chunks, no tokens with padding.
CASES = [c for c in moe_tests.CASES if c[0] < 300] + [
    (5, 3, 1, 1, 1, 0, torch.float32),          # E = 1
    (9, 6, 5, 5, 2, 0, torch.float16),          # k = E
    (12, 4, 1200, 3, 1, 0, torch.float32),      # more experts than the scan's 1024 threads
    (1100, 2, 4, 2, 8, 300, torch.float32),     # three counting chunks (1024 slots each), capacity
    (0, 5, 4, 2, 8, 0, torch.bfloat16),         # no tokens: only padding rows
]


def case_id(c):
    return "T{}-H{}-E{}-k{}-pad{}-cap{}-{}".format(*c[:6], str(c[6])[6:])


def check_against_reference(emu, case, seed=0, score_func="softmax", renormalize=True, with_bias=False,
                            int64_ids=False, offset=0):
    """Every emulated op against the reference and the CPU kernel; permute and unpermute
    outputs must be identical (their order and arithmetic are specified exactly)."""
    T, H, E, k, pad, cap, dtype = case
    logits, x = moe_tests._inputs(case, "cpu", seed)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * 0.1 if with_bias else None
    ids, weights, counts = emu.moe_route(logits, k, score_func, renormalize, bias)
    r_ids, r_weights, r_counts = ops.route_reference(logits, k, score_func, renormalize, bias)
    assert torch.equal(ids, r_ids) and torch.equal(counts, r_counts)
    torch.testing.assert_close(weights, r_weights, rtol=1e-5, atol=1e-6)
    if has_kernel("moe_route", "cpu"):
        assert torch.equal(ids, torch.ops.steplaw.moe_route(logits, k, score_func, renormalize, bias)[0])

    ids_in = ids.long() if int64_ids else ids
    x_in = moe_tests._offset_view(x, offset) if offset else x
    got = emu.moe_permute(x_in, ids_in, E, pad, cap)
    want = ops.permute_reference(x, r_ids, E, pad, cap)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)
    permuted, row_map, src, offsets, dropped = got
    # The invariants the layout promises, checked directly as well.
    rows_per_expert = offsets[1:] - offsets[:-1]
    assert int(rows_per_expert.sum()) <= permuted.shape[0] and bool((rows_per_expert % pad == 0).all())
    kept = row_map[row_map >= 0]
    assert torch.equal(src[kept], torch.nonzero(row_map.view(-1) >= 0).view(-1))  # inverse map

    gen = torch.Generator().manual_seed(seed + 2)
    y = torch.randn(permuted.shape, generator=gen).to(dtype)
    y_in = moe_tests._offset_view(y, offset) if offset else y
    out = emu.moe_unpermute(y_in, row_map, src, weights)
    assert torch.equal(out, ops.unpermute_reference(y, row_map, src, weights))

    grad_out = torch.randn(T, H, generator=gen).to(dtype)
    g_in = moe_tests._offset_view(grad_out, offset) if offset else grad_out
    grad_y, grad_w = emu.moe_unpermute_backward(g_in, y_in, row_map, src, weights)
    ref_grad_y, ref_grad_w = ops.unpermute_backward_reference(grad_out, y, row_map, src, weights)
    assert torch.equal(grad_y, ref_grad_y) and grad_w.dtype == ref_grad_w.dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(grad_w, ref_grad_w, **tol)
    if has_kernel("moe_unpermute_backward", "cpu"):
        cpu_grad_y, cpu_grad_w = torch.ops.steplaw.moe_unpermute_backward(grad_out, y, row_map, src, weights)
        assert torch.equal(grad_y, cpu_grad_y)
        torch.testing.assert_close(grad_w, cpu_grad_w, **tol)

    grad_perm = torch.randn(permuted.shape, generator=gen).to(dtype)
    gp_in = moe_tests._offset_view(grad_perm, offset) if offset else grad_perm
    grad_x = emu.moe_permute_backward(gp_in, row_map)
    assert torch.equal(grad_x, ops.permute_backward_reference(grad_perm, row_map))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(emu, case):
    check_against_reference(emu, case)


@pytest.mark.parametrize("score_func,renormalize,with_bias", [
    ("softmax", False, False), ("softmax", True, True), ("sigmoid", True, True), ("sigmoid", False, False)])
def test_route_variants(emu, score_func, renormalize, with_bias):
    check_against_reference(emu, (40, 8, 12, 3, 1, 0, torch.float32), score_func=score_func,
                            renormalize=renormalize, with_bias=with_bias)


def test_int64_ids(emu):
    check_against_reference(emu, (33, 8, 8, 2, 4, 3, torch.float32), int64_ids=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("H,offset", [(7, 1), (8, 1), (8, 4), (16, 2)])
def test_misaligned_storage_takes_narrower_accesses(emu, dtype, H, offset):
    """Row starts off 16-byte alignment: the vector width falls back (a misaligned vector
    access would trip the alignment sanitizer the emulated module is built with)."""
    check_against_reference(emu, (37, H, 6, 2, 4, 0, dtype), offset=offset)


def test_non_contiguous_inputs(emu):
    x = torch.randn(16, 12)[:, ::2]
    ids = torch.randint(0, 4, (16, 4), dtype=torch.int32)[:, ::2]
    got = emu.moe_permute(x, ids, 4, 1, 0)
    want = ops.permute_reference(x.contiguous(), ids.contiguous(), 4)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    weights = torch.rand(16, 4)[:, ::2]
    y = torch.randn(64, 6)[::2]
    out = emu.moe_unpermute(y, got[1], got[2], weights)
    assert torch.equal(out, ops.unpermute_reference(y.contiguous(), got[1], got[2], weights.contiguous()))


def test_unpermute_backward_skips_rows_past_the_end_like_cpu(emu):
    gen = torch.Generator().manual_seed(11)
    T, H, E, k = 9, 8, 4, 2
    ids, weights, _ = ops.route_reference(torch.randn(T, E, generator=gen), k)
    _, row_map, src, _, _ = ops.permute_reference(torch.randn(T, H, generator=gen), ids, E)
    row_map = row_map.clone()
    row_map[3, 1] = src.shape[0]
    y, grad_out = torch.randn(src.shape[0], H, generator=gen), torch.randn(T, H, generator=gen)
    _, want = ops.unpermute_backward_reference(grad_out, y, row_map, src, weights)
    _, grad_w = emu.moe_unpermute_backward(grad_out, y, row_map, src, weights)
    assert float(grad_w[3, 1]) == 0.0
    torch.testing.assert_close(grad_w, want)


# ---------------------------------------------------------------- bad input

def _bad_calls():
    x, ids = torch.randn(6, 4), torch.zeros(6, 2, dtype=torch.int32)
    logits = torch.randn(6, 4)
    _, row_map, src, _, _ = ops.permute_reference(x, ids, 4)
    w = torch.rand(6, 2)
    return {
        "route_k_too_big": ("moe_route", (logits, 5, "softmax", True, None)),
        "route_score_func": ("moe_route", (logits, 2, "relu", True, None)),
        "route_bias_shape": ("moe_route", (logits, 2, "softmax", True, torch.zeros(3))),
        "route_int_logits": ("moe_route", (torch.zeros(6, 4, dtype=torch.int32), 2, "softmax", True, None)),
        "permute_x_1d": ("moe_permute", (torch.randn(6), ids, 4, 1, 0)),
        "permute_ids_rows": ("moe_permute", (x, ids[:5], 4, 1, 0)),
        "permute_ids_dtype": ("moe_permute", (x, ids.to(torch.int16), 4, 1, 0)),
        "permute_topk_gt_E": ("moe_permute", (x, ids, 1, 1, 0)),
        "permute_pad": ("moe_permute", (x, ids, 4, 0, 0)),
        "permute_capacity": ("moe_permute", (x, ids, 4, 1, -1)),
        "unpermute_weights_shape": ("moe_unpermute", (x, row_map, src[:6], w[:, :1])),
        "unpermute_src_rows": ("moe_unpermute", (torch.randn(12, 4), row_map, src[:5], w)),
        "unpermute_int_weights": ("moe_unpermute", (torch.randn(12, 4), row_map, src, w.int())),
        "permute_backward_int32_map": ("moe_permute_backward", (torch.randn(12, 4), row_map.int())),
        "unpermute_backward_grad_shape": ("moe_unpermute_backward",
                                          (torch.randn(5, 4), torch.randn(12, 4), row_map, src, w)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises_what_the_cpu_kernel_raises(emu_ops, name):
    op, args = _bad_calls()[name]
    with pytest.raises(ValueError) as cpu_error:
        getattr(torch.ops.steplaw, op)(*args)
    with pytest.raises(ValueError) as emu_error:
        getattr(emu_ops, op)(*args)
    assert str(emu_error.value) == str(cpu_error.value)


@pytest.mark.parametrize("bad_id", [4, -1, 2**32 + 1])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_out_of_range_expert_id_trips_the_device_assert(emu_ops, bad_id, ids_dtype):
    """The CPU kernel raises ValueError; a GPU traps on the device assert: the emulation must
    fail loudly too (never write a row for the bad id and go on)."""
    if ids_dtype == torch.int32 and bad_id > 2**31:
        pytest.skip("not an int32")
    ids = torch.zeros(6, 2, dtype=ids_dtype)
    ids[3, 1] = bad_id
    with pytest.raises(RuntimeError, match="device-side assert triggered.*expert id out of range"):
        emu_ops.moe_permute(torch.randn(6, 4), ids, 4, 1, 0)


def test_combine_row_past_the_end_trips_the_device_assert(emu_ops):
    x, ids = torch.randn(6, 4), torch.zeros(6, 2, dtype=torch.int32)
    _, row_map, src, _, _ = ops.permute_reference(x, ids, 4)
    row_map = row_map.clone()
    row_map[2, 0] = 12
    with pytest.raises(RuntimeError, match="device-side assert triggered.*row map holds a row past"):
        emu_ops.moe_unpermute(torch.randn(12, 4), row_map, src, torch.rand(6, 2))
