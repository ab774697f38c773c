"""MoE dispatch ops: the reference on hand-worked cases; each compiled kernel (CPU, and
CUDA under the `gpu` mark) against the reference; opcheck; float64 gradcheck; errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steplaw.ops import moe as ops
from steplaw.ops._loader import has_kernel

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def need_kernel(device: str, name: str = "moe_permute") -> None:
    if not has_kernel(name, device):
        pytest.skip(f"steplaw._C has no {device} kernel of {name} (extension not built)")


# ---------------------------------------------------------------- reference, by hand

def test_permute_reference_hand_worked():
    x = torch.arange(12.0).view(4, 3)
    ids = torch.tensor([[1, 0], [1, 2], [0, 1], [2, 0]], dtype=torch.int32)
    permuted, row_map, src, offsets, dropped = ops.permute_reference(x, ids, 3)
    # expert 0 gets tokens 0, 2, 3; expert 1 tokens 0, 1, 2; expert 2 tokens 1, 3 (token order)
    assert permuted[:, 0].tolist() == [0, 6, 9, 0, 3, 6, 3, 9]
    assert row_map.tolist() == [[3, 0], [4, 6], [1, 5], [7, 2]]
    assert src.tolist() == [1, 4, 7, 0, 2, 5, 3, 6]
    assert offsets.tolist() == [0, 3, 6, 8] and int(dropped) == 0

    permuted, row_map, src, offsets, dropped = ops.permute_reference(x, ids, 4, pad_multiple=2)
    assert offsets.tolist() == [0, 4, 8, 10, 10] and permuted.shape == (8 + 4 * 1, 3)
    assert src.tolist() == [1, 4, 7, -1, 0, 2, 5, -1, 3, 6, -1, -1]
    assert permuted[src < 0].abs().sum() == 0

    permuted, row_map, src, offsets, dropped = ops.permute_reference(x, ids, 3, capacity=1)
    assert row_map.tolist() == [[1, 0], [-1, 2], [-1, -1], [-1, -1]]
    assert offsets.tolist() == [0, 1, 2, 3] and int(dropped) == 5


def test_unpermute_reference_hand_worked():
    y = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    row_map = torch.tensor([[2, 0], [1, -1]])
    src = torch.tensor([1, 2, 0])
    weights = torch.tensor([[0.5, 0.25], [2.0, 9.0]])
    out = ops.unpermute_reference(y, row_map, src, weights)
    assert out.tolist() == [[50.25, 100.5], [20.0, 40.0]]


def test_route_reference_ties_bias_and_weights():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    ids, weights, counts = ops.route_reference(logits, 2, "softmax", renormalize=True)
    assert ids.tolist() == [[0, 1], [1, 2]]  # ties go to the lower index
    assert ids.dtype == torch.int32 and counts.tolist() == [1, 2, 1, 0]
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]))
    # a bias changes which experts are chosen, not their weights
    bias = torch.tensor([0.0, -10.0, 0.0, 10.0])
    ids_b, weights_b, _ = ops.route_reference(logits, 2, "softmax", renormalize=False, bias=bias)
    assert ids_b.tolist() == [[3, 0], [3, 2]]
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(weights_b, probs.gather(1, ids_b.long()))
    ids_s, weights_s, _ = ops.route_reference(logits, 1, "sigmoid", renormalize=False)
    torch.testing.assert_close(weights_s[:, 0], torch.sigmoid(torch.tensor([0.0, 3.0])))


@pytest.mark.parametrize("T,k,E,pad,cap,rows", [
    (10, 2, 4, 1, 0, 20), (10, 2, 4, 8, 0, 20 + 4 * 7), (10, 2, 4, 1, 3, 12), (10, 2, 4, 8, 3, 32), (0, 1, 3, 1, 0, 0)])
def test_permuted_rows_known_from_shapes(T, k, E, pad, cap, rows):
    assert ops.permuted_rows(T, k, E, pad, cap) == rows
    x = torch.randn(T, 2)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32) if T else torch.zeros(0, k, dtype=torch.int32)
    assert ops.moe_permute(x, ids, E, pad, cap)[0].shape == (rows, 2)


@pytest.mark.parametrize("T,k,E,factor,capacity",
                         [(100, 2, 8, None, 0), (100, 2, 8, 1.0, 25), (100, 2, 8, 1.25, 32), (3, 1, 8, 0.5, 1)])
def test_expert_capacity(T, k, E, factor, capacity):
    assert ops.expert_capacity(T, k, E, factor) == capacity


# ---------------------------------------------------------------- kernels vs reference

# (T, H, E, k, pad_multiple, capacity, dtype)
CASES = [
    (0, 8, 4, 2, 1, 0, torch.float32),
    (1, 1, 1, 1, 1, 0, torch.float32),
    (7, 5, 3, 3, 1, 0, torch.float32),
    (33, 16, 8, 2, 1, 0, torch.bfloat16),
    (33, 24, 8, 2, 4, 0, torch.float16),
    (64, 8, 16, 4, 1, 5, torch.float32),
    (64, 8, 16, 4, 8, 3, torch.bfloat16),
    (50, 40, 512, 8, 1, 0, torch.float32),   # many experts, most of them empty
    (300, 64, 64, 8, 16, 0, torch.bfloat16),
    (257, 3, 2, 2, 1, 100, torch.float64),
    (20000, 4, 8, 2, 1, 0, torch.float32),   # enough counting chunks to count in parallel
    (20000, 4, 8, 2, 4, 4000, torch.bfloat16),
]


def _inputs(case, device, seed=0):
    T, H, E, k, pad, cap, dtype = case
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * 3
    x = torch.randn(T, H, generator=gen).to(dtype)
    return logits.to(device), x.to(device)


def _check_all(case, device, seed=0, score_func="softmax", renormalize=True, with_bias=False):
    T, H, E, k, pad, cap, dtype = case
    logits, x = _inputs(case, device, seed)
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * 0.1).to(device) if with_bias else None

    ids, weights, counts = torch.ops.steplaw.moe_route(logits, k, score_func, renormalize, bias)
    r_ids, r_weights, r_counts = ops.route_reference(logits.cpu(), k, score_func, renormalize,
                                                     None if bias is None else bias.cpu())
    assert torch.equal(ids.cpu(), r_ids) and torch.equal(counts.cpu(), r_counts)
    torch.testing.assert_close(weights.cpu(), r_weights, rtol=1e-5, atol=1e-6)

    got = torch.ops.steplaw.moe_permute(x, ids, E, pad, cap)
    want = ops.permute_reference(x.cpu(), r_ids, E, pad, cap)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w), "permute outputs must be identical to the reference"
    permuted, row_map, src, offsets, dropped = got

    y = torch.randn(permuted.shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(device)
    out = torch.ops.steplaw.moe_unpermute(y, row_map, src, weights)
    assert torch.equal(out.cpu(), ops.unpermute_reference(y.cpu(), row_map.cpu(), src.cpu(), weights.cpu()))

    # backward kernels vs autograd of the reference
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 3)).to(dtype)
    y_ref = y.cpu().requires_grad_(True)
    w_ref = weights.cpu().requires_grad_(True)
    ops.unpermute_reference(y_ref, row_map.cpu(), src.cpu(), w_ref).backward(grad_out)
    grad_y, grad_w = torch.ops.steplaw.moe_unpermute_backward(grad_out.to(device), y, row_map, src, weights)
    assert torch.equal(grad_y.cpu(), y_ref.grad)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(grad_w.cpu(), w_ref.grad, **tol)
    # ... and vs the backward ops' own references (their fallback kernels)
    ref_grad_y, ref_grad_w = ops.unpermute_backward_reference(grad_out, y.cpu(), row_map.cpu(), src.cpu(), weights.cpu())
    assert torch.equal(grad_y.cpu(), ref_grad_y) and ref_grad_w.dtype == grad_w.dtype
    torch.testing.assert_close(grad_w.cpu(), ref_grad_w, **tol)

    grad_perm = torch.randn(permuted.shape, generator=torch.Generator().manual_seed(seed + 4)).to(dtype)
    x_ref = x.cpu().requires_grad_(True)
    ops.permute_reference(x_ref, r_ids, E, pad, cap)[0].backward(grad_perm)
    grad_x = torch.ops.steplaw.moe_permute_backward(grad_perm.to(device), row_map)
    torch.testing.assert_close(grad_x.cpu(), x_ref.grad, **tol)
    assert torch.equal(grad_x.cpu(), ops.permute_backward_reference(grad_perm, row_map.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}-E{}-k{}-pad{}-cap{}-{}".format(*c[:6], str(c[6])[6:]))
def test_kernels_match_reference(case, device):
    need_kernel(device)
    _check_all(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_func,renormalize,with_bias", [
    ("softmax", False, False), ("softmax", True, True), ("sigmoid", True, True), ("sigmoid", False, False)])
def test_route_variants_match_reference(score_func, renormalize, with_bias, device):
    need_kernel(device)
    _check_all((40, 8, 12, 3, 1, 0, torch.float32), device, score_func=score_func, renormalize=renormalize, with_bias=with_bias)


@pytest.mark.parametrize("device", DEVICES)
def test_random_shapes_match_reference(device):
    need_kernel(device)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(T=st.integers(0, 200), H=st.integers(1, 33), E=st.integers(1, 70), data=st.data())
    def check(T, H, E, data):
        k = data.draw(st.integers(1, min(E, 8)))
        pad = data.draw(st.sampled_from([1, 2, 8]))
        cap = data.draw(st.sampled_from([0, 0, 1, 7]))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        _check_all((T, H, E, k, pad, cap, dtype), device, seed=T * 131 + H)

    check()


def test_non_contiguous_inputs():
    need_kernel("cpu")
    x = torch.randn(16, 12)[:, ::2]
    ids = torch.randint(0, 4, (16, 4), dtype=torch.int32)[:, ::2]
    got = ops.moe_permute(x, ids, 4)
    want = ops.permute_reference(x.contiguous(), ids.contiguous(), 4)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    weights = torch.rand(16, 4)[:, ::2]
    y = torch.randn(64, 6)[::2]
    out = ops.moe_unpermute(y, got[1], got[2], weights)
    assert torch.equal(out, ops.unpermute_reference(y.contiguous(), got[1], got[2], weights.contiguous()))


def _offset_view(t, offset):
    """The same values in a view whose data pointer is `offset` elements into an allocation
    (row starts not 16-byte aligned: the kernels must fall back to narrower accesses)."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("H,offset", [(7, 1), (8, 1), (8, 4), (16, 2), (3, 0)])
def test_cuda_misaligned_and_strided_views(dtype, H, offset):
    need_kernel("cuda")
    T, E, k, pad, cap = 37, 6, 2, 4, 0
    gen = torch.Generator().manual_seed(H * 10 + offset)
    logits = torch.randn(T, E, generator=gen)
    x_cpu = torch.randn(T, H, generator=gen).to(dtype)
    ids, weights, _ = ops.route_reference(logits, k)
    want = ops.permute_reference(x_cpu, ids, E, pad, cap)
    got = torch.ops.steplaw.moe_permute(_offset_view(x_cpu.cuda(), offset), ids.cuda(), E, pad, cap)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    # a strided (non-contiguous) input: every second column of a wider tensor
    wide = torch.randn(T, 2 * H, generator=gen).to(dtype)
    got = torch.ops.steplaw.moe_permute(wide.cuda()[:, ::2], ids.cuda(), E, pad, cap)
    assert torch.equal(got[0].cpu(), ops.permute_reference(wide[:, ::2].contiguous(), ids, E, pad, cap)[0])

    _, row_map, src, _, _ = want
    y = torch.randn(src.shape[0], H, generator=gen).to(dtype)
    out = torch.ops.steplaw.moe_unpermute(_offset_view(y.cuda(), offset), row_map.cuda(), src.cuda(), weights.cuda())
    assert torch.equal(out.cpu(), ops.unpermute_reference(y, row_map, src, weights))

    grad_out = torch.randn(T, H, generator=gen).to(dtype)
    grad_y, grad_w = torch.ops.steplaw.moe_unpermute_backward(
        _offset_view(grad_out.cuda(), offset), _offset_view(y.cuda(), offset), row_map.cuda(), src.cuda(), weights.cuda())
    cpu_grad_y, cpu_grad_w = torch.ops.steplaw.moe_unpermute_backward(grad_out, y, row_map, src, weights)
    assert torch.equal(grad_y.cpu(), cpu_grad_y)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(grad_w.cpu(), cpu_grad_w, **tol)

    grad_perm = torch.randn(src.shape[0], H, generator=gen).to(dtype)
    grad_x = torch.ops.steplaw.moe_permute_backward(_offset_view(grad_perm.cuda(), offset), row_map.cuda())
    assert torch.equal(grad_x.cpu(), torch.ops.steplaw.moe_permute_backward(grad_perm, row_map))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    (64, 8, 2048, 4, 1, 0, torch.float32),        # more experts than the scan's 1024 threads
    (1000, 7, 1500, 8, 2, 3, torch.bfloat16),     # many experts, 8 counting chunks, padded, capacity
    (0, 5, 4, 2, 8, 0, torch.bfloat16),           # no tokens: only padding rows
])
def test_cuda_large_shapes_match_reference(case):
    need_kernel("cuda")
    _check_all(case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pad,cap", [(1, 0), (8, 80000)])
def test_cuda_permute_with_more_than_1024_counting_chunks(pad, cap):
    """Over 1024 * 1024 slots the CUDA counting chunks grow past kCountChunk; the order
    must still be the reference's. Ids drawn directly: no near-ties in routing to flake."""
    need_kernel("cuda")
    gen = torch.Generator().manual_seed(7)
    T, H, E, k = 300000, 3, 16, 4
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(64)]).repeat(T // 64 + 1, 1)[:T]
    ids = ids[torch.randperm(T, generator=gen)].to(torch.int32)
    x = torch.randn(T, H, generator=gen)
    got = torch.ops.steplaw.moe_permute(x.cuda(), ids.cuda(), E, pad, cap)
    want = ops.permute_reference(x, ids, E, pad, cap)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    weights = torch.rand(T, k, generator=gen)
    y = torch.randn(got[0].shape, generator=gen)
    out = torch.ops.steplaw.moe_unpermute(y.cuda(), got[1], got[2], weights.cuda())
    assert torch.equal(out.cpu(), ops.unpermute_reference(y, want[1], want[2], weights))


@pytest.mark.gpu
def test_cuda_unpermute_backward_skips_rows_past_the_end_like_cpu():
    need_kernel("cuda")
    gen = torch.Generator().manual_seed(11)
    T, H, E, k = 9, 8, 4, 2
    ids, weights, _ = ops.route_reference(torch.randn(T, E, generator=gen), k)
    _, row_map, src, _, _ = ops.permute_reference(torch.randn(T, H, generator=gen), ids, E)
    row_map = row_map.clone()
    row_map[3, 1] = src.shape[0]  # one past the last row
    y, grad_out = torch.randn(src.shape[0], H, generator=gen), torch.randn(T, H, generator=gen)
    _, cpu_grad_w = torch.ops.steplaw.moe_unpermute_backward(grad_out, y, row_map, src, weights)
    _, grad_w = torch.ops.steplaw.moe_unpermute_backward(grad_out.cuda(), y.cuda(), row_map.cuda(), src.cuda(),
                                                         weights.cuda())
    assert float(cpu_grad_w[3, 1]) == 0.0
    torch.testing.assert_close(grad_w.cpu(), cpu_grad_w)


@pytest.mark.gpu
def test_cuda_permute_backward_rejects_a_host_row_map():
    need_kernel("cuda")
    with pytest.raises(ValueError, match="row map on cpu"):
        torch.ops.steplaw.moe_permute_backward(torch.randn(6, 4, device="cuda"), torch.zeros(3, 2, dtype=torch.long))


# ---------------------------------------------------------------- opcheck, gradcheck

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(9, 4, 5, 2, 1, 0, torch.float32), (9, 4, 5, 2, 4, 2, torch.float32)])
def test_opcheck(case, device):
    need_kernel(device)
    T, H, E, k, pad, cap, dtype = case
    logits, x = _inputs(case, device)
    # moe_route's first output is the int32 ids (the wrapper's order); opcheck's AOT tests
    # sum the outputs into a tensor typed by the first one and cannot add the float weights
    # to an integer sum (torch's harness, not the op): they run in test_route_compiles_with_
    # aot_autograd_forward_and_backward instead.
    route_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.steplaw.moe_route, (logits.requires_grad_(), k, "softmax", True, None),
                          test_utils=route_utils)
    torch.library.opcheck(torch.ops.steplaw.moe_route, (logits, k, "sigmoid", False, torch.zeros(E, device=device)),
                          test_utils=route_utils)
    ids, weights, _ = ops.moe_route(logits.detach(), k)
    torch.library.opcheck(torch.ops.steplaw.moe_permute, (x.requires_grad_(), ids, E, pad, cap))
    permuted, row_map, src, _, _ = ops.moe_permute(x.detach(), ids, E, pad, cap)
    y = torch.randn_like(permuted).requires_grad_()
    torch.library.opcheck(torch.ops.steplaw.moe_unpermute, (y, row_map, src, weights.detach().requires_grad_()))
    torch.library.opcheck(torch.ops.steplaw.moe_permute_backward, (permuted.detach(), row_map))
    torch.library.opcheck(torch.ops.steplaw.moe_unpermute_backward,
                          (torch.randn(T, H, device=device), y.detach(), row_map, src, weights.detach()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad,cap", [(1, 0), (4, 0), (1, 2)])
def test_gradcheck_float64(pad, cap, device):
    need_kernel(device)
    gen = torch.Generator().manual_seed(3)
    T, H, E, k = 7, 3, 4, 2
    logits = (torch.randn(T, E, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    for score_func in ("softmax", "sigmoid"):
        for renormalize in (True, False):
            def route_weights(logits, score_func=score_func, renormalize=renormalize):
                return torch.ops.steplaw.moe_route(logits, k, score_func, renormalize, None)[1]

            torch.autograd.gradcheck(route_weights, (logits,))
    x = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    ids, weights, _ = ops.moe_route(logits.detach(), k)
    torch.autograd.gradcheck(lambda x: torch.ops.steplaw.moe_permute(x, ids, E, pad, cap)[0], (x,))
    _, row_map, src, _, _ = ops.moe_permute(x.detach(), ids, E, pad, cap)
    y = torch.randn(src.shape[0], H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = weights.detach().clone().requires_grad_()
    torch.autograd.gradcheck(lambda y, w: torch.ops.steplaw.moe_unpermute(y, row_map, src, w), (y, w))


def test_compile_fullgraph_no_graph_break():
    need_kernel("cpu")

    def dispatch(x, logits):
        ids, weights, _ = ops.moe_route(logits, 2)
        permuted, row_map, src, offsets, dropped = ops.moe_permute(x, ids, 4, 8)
        return ops.moe_unpermute(permuted * 2, row_map, src, weights)

    x, logits = torch.randn(10, 6), torch.randn(10, 4)
    compiled = torch.compile(dispatch, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, logits), dispatch(x, logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_route_compiles_with_aot_autograd_forward_and_backward(device, dynamic):
    need_kernel(device, "moe_route")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 5, generator=gen).to(device)

    def loss(scores):
        ids, weights, counts = torch.ops.steplaw.moe_route(scores, 2, "sigmoid", True, None)
        return (weights * torch.arange(1.0, 3.0, device=scores.device)).sum(), ids, counts

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    eager_in, compiled_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager_out, compiled_out = loss(eager_in), compiled(compiled_in)
    eager_out[0].backward()
    compiled_out[0].backward()
    torch.testing.assert_close(compiled_out[0], eager_out[0])
    assert torch.equal(compiled_out[1], eager_out[1]) and torch.equal(compiled_out[2], eager_out[2])
    torch.testing.assert_close(compiled_in.grad, eager_in.grad)
    assert compiled_in.grad.abs().sum() > 0


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """No host sync inside: the whole dispatch captures into a CUDA graph."""
    need_kernel("cuda")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen).cuda()
    logits = torch.randn(64, 16, generator=gen).cuda()

    def dispatch():
        ids, weights, _ = ops.moe_route(logits, 4)
        permuted, row_map, src, offsets, dropped = ops.moe_permute(x, ids, 16, 8, 0)
        return ops.moe_unpermute(permuted * 3, row_map, src, weights)

    expected = dispatch()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dispatch()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dispatch()
    x.copy_(torch.randn(64, 32, generator=gen).cuda())
    logits.copy_(torch.randn(64, 16, generator=gen).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, dispatch()) and not torch.equal(captured, expected)

