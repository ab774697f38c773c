"""MoE ops: the one error rule (kernel and reference raise the same ValueError), int64
expert ids, NaN router scores, and the reference as the ops' fallback kernel."""
import re

import pytest
import torch

# pytest (rootdir import mode "prepend") puts this folder on sys.path.
from test_moe_ops import DEVICES, need_kernel

from steplaw.ops import moe as ops
from steplaw.ops._loader import REFERENCES, reference_kernels


def _bad_calls():
    """(name, op, args) of one mistake each: every implementation must reject it alike."""
    x, ids = torch.randn(4, 3), torch.tensor([[0], [1], [2], [2]], dtype=torch.int32)
    row_map, src = torch.zeros(4, 2, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    y, w = torch.randn(8, 3), torch.rand(4, 2)
    return [
        ("top_k", "moe_route", (torch.randn(4, 3), 4, "softmax", True, None)),
        ("score_func", "moe_route", (torch.randn(4, 3), 1, "relu", True, None)),
        ("int logits", "moe_route", (torch.zeros(4, 3, dtype=torch.long), 1, "softmax", True, None)),
        ("bias shape", "moe_route", (torch.randn(4, 3), 1, "softmax", True, torch.zeros(4))),
        ("id too big", "moe_permute", (x, torch.tensor([[0], [1], [7], [2]], dtype=torch.int32), 3, 1, 0)),
        ("id negative", "moe_permute", (x, torch.tensor([[0], [-1], [2], [-5]], dtype=torch.int32), 3, 1, 0)),
        ("id 2^32+1", "moe_permute", (x, torch.tensor([[0], [2**32 + 1], [2], [1]]), 3, 1, 0)),
        ("id -2^32", "moe_permute", (x, torch.tensor([[0], [1], [-(2**32)], [1]]), 3, 1, 0)),
        ("ids shape", "moe_permute", (x, torch.zeros(5, 1, dtype=torch.int32), 3, 1, 0)),
        ("ids dtype", "moe_permute", (x, ids.to(torch.int16), 3, 1, 0)),
        ("permute top_k", "moe_permute", (x, torch.zeros(4, 4, dtype=torch.int32), 3, 1, 0)),
        ("pad", "moe_permute", (x, ids, 3, 0, 0)),
        ("tokens 3-d", "moe_permute", (x.view(4, 3, 1), ids, 3, 1, 0)),
        ("weights shape", "moe_unpermute", (y, row_map, src, torch.rand(4, 3))),
        ("row map dtype", "moe_unpermute", (y, row_map.int(), src, w)),
        ("int weights", "moe_unpermute", (y, row_map, src, w.long())),
        ("row past y", "moe_unpermute", (y, row_map + 8, src, w)),
        ("src rows", "moe_unpermute", (y, row_map, src[:5], w)),
        ("permute_backward dtype", "moe_permute_backward", (y, row_map.int())),
        ("unpermute_backward grad", "moe_unpermute_backward", (torch.randn(3, 3), y, row_map, src, w)),
        ("unpermute_backward dtype", "moe_unpermute_backward", (torch.randn(4, 3).double(), y, row_map, src, w)),
    ]


@pytest.mark.parametrize("name,op,args", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_kernel_and_reference_raise_the_same_error(name, op, args):
    """One rule: ValueError, the same sentence, prefixed "steplaw: ", from the compiled
    kernel, the reference called directly and the reference as the op's kernel."""
    need_kernel("cpu", op)
    errors = []
    with pytest.raises(ValueError) as kernel_error:
        getattr(torch.ops.steplaw, op)(*args)
    errors.append(kernel_error.value)
    with pytest.raises(ValueError) as reference_error:
        REFERENCES[op](*args)
    errors.append(reference_error.value)
    with reference_kernels([op]), pytest.raises(ValueError) as registered_error:
        getattr(torch.ops.steplaw, op)(*args)
    errors.append(registered_error.value)
    assert {type(e) for e in errors} == {ValueError}
    assert str(errors[0]) == str(errors[1]) == str(errors[2]), [str(e) for e in errors]
    assert str(errors[0]).startswith("steplaw: ") and "\n" not in str(errors[0])


def test_error_sentences_name_the_value():
    calls = {name: (op, args) for name, op, args in _bad_calls()}
    expected = {"top_k": "top_k=4", "score_func": "score_func='relu'", "id too big": "expert id 7 ",
                "id negative": "expert id -1 ", "id 2^32+1": "expert id 4294967297 ",
                "id -2^32": "expert id -4294967296 ", "ids shape": "expert ids of shape [5, 1]",
                "ids dtype": "expert ids of dtype torch.int16", "weights shape": "combine weights of shape [4, 3]",
                "row past y": "row map holds a row >= 8"}
    for name, text in expected.items():
        op, args = calls[name]
        with pytest.raises(ValueError, match=re.escape(text)):
            REFERENCES[op](*args)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_route(torch.randn(4, 3), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_ids_give_the_int32_result(device):
    need_kernel(device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=gen).to(device)
    ids = torch.randint(0, 5, (50, 2), generator=gen).to(device)
    for pad, cap in ((1, 0), (4, 7)):
        got = ops.moe_permute(x, ids, 5, pad, cap)
        want = ops.moe_permute(x, ids.int(), 5, pad, cap)
        ref = ops.permute_reference(x.cpu(), ids.cpu(), 5, pad, cap)
        for g, w, r in zip(got, want, ref):
            assert torch.equal(g, w) and torch.equal(g.cpu(), r)


@pytest.mark.gpu
def test_cuda_rejects_int64_id_that_would_wrap_to_a_valid_one():
    """On CUDA a bad id trips a device assert (no sync to raise): run it in a child."""
    import subprocess
    import sys
    import textwrap

    need_kernel("cuda")
    code = textwrap.dedent("""
        import torch, steplaw.ops as ops
        x = torch.randn(4, 8, device="cuda")
        ids = torch.tensor([[0], [2**32 + 1], [2], [1]], device="cuda")
        out = ops.moe_permute(x, ids, 3)
        torch.cuda.synchronize()
        print("accepted", out[1].tolist())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "accepted" not in result.stdout, result.stdout


def _nan_logits(score_func):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 8, generator=gen)
    logits[3, 5] = float("nan")                    # one NaN expert
    logits[7, :] = float("nan")                    # a whole NaN row
    logits[9, 0] = logits[9, 6] = float("nan")     # two NaNs: the lower index first
    logits[11, 2] = float("-inf")
    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nan_logits_route_alike_everywhere(device, score_func, with_bias):
    """A NaN score ranks above every number (NaNs by index), as torch.topk: the kernel and
    the reference pick the same experts and both carry the NaN into the weights."""
    need_kernel(device, "moe_route")
    logits = _nan_logits(score_func)
    bias = torch.linspace(-0.1, 0.1, 8) if with_bias else None
    ids, weights, counts = torch.ops.steplaw.moe_route(logits.to(device), 3, score_func, True,
                                                      None if bias is None else bias.to(device))
    r_ids, r_weights, r_counts = ops.route_reference(logits, 3, score_func, True, bias)
    assert torch.equal(ids.cpu(), r_ids) and torch.equal(counts.cpu(), r_counts)
    torch.testing.assert_close(weights.cpu(), r_weights, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert r_ids[7].tolist() == [0, 1, 2] and torch.isnan(r_weights[7]).all()
    if score_func == "sigmoid":
        assert r_ids[3, 0] == 5 and r_ids[9, :2].tolist() == [0, 6]
    assert torch.isfinite(r_weights[0]).all()


def test_reference_kernels_route_the_ops_to_the_references(monkeypatch):
    need_kernel("cpu")
    calls = []
    reference = REFERENCES["moe_permute"]

    def spy(*args):
        calls.append(1)
        return reference(*args)

    monkeypatch.setitem(REFERENCES, "moe_permute", spy)
    x, ids = torch.randn(6, 4), torch.randint(0, 3, (6, 2), dtype=torch.int32)
    with reference_kernels(["moe_permute"]):
        inside = ops.moe_permute(x, ids, 3)
    outside = ops.moe_permute(x, ids, 3)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_ops_run_on_the_references_without_the_extension():
    """Without steplaw._C every op is defined in Python on its reference: the wrappers,
    autograd and the backward ops work, and match the references called directly."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["steplaw._C"] = None
        import torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import steplaw.ops as ops
        from steplaw.ops import moe
        torch.manual_seed(0)
        logits = torch.randn(20, 6, requires_grad=True)
        x = torch.randn(20, 5, requires_grad=True)
        ids, w, counts = ops.moe_route(logits, 2)
        permuted, row_map, src, offsets, dropped = ops.moe_permute(x, ids, 6, 4)
        out = ops.moe_unpermute(permuted * 2, row_map, src, w)
        out.square().sum().backward()
        l2, x2 = logits.detach().requires_grad_(), x.detach().requires_grad_()
        i2, w2, _ = moe.route_reference(l2, 2)
        p2, r2, s2, _, _ = moe.permute_reference(x2, i2, 6, 4)
        moe.unpermute_reference(p2 * 2, r2, s2, w2).square().sum().backward()
        assert torch.equal(out, moe.unpermute_reference(p2 * 2, r2, s2, w2))
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(logits.grad, l2.grad)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_python_schemas_match_the_extension():
    """ops/moe.py's SCHEMAS (used when _C is missing) repeat csrc/steplaw.cpp's exactly."""
    need_kernel("cpu")
    for name in ops.OP_NAMES:
        schema = str(getattr(torch.ops.steplaw, name).default._schema)
        assert schema == f"steplaw::{name}" + ops.SCHEMAS[name], name
