"""steplaw::fused_adamw_ as an op: opcheck, the reference against the kernels, edge cases."""
import pytest
import torch

import steplaw.ops  # noqa: F401 - registers the op
from steplaw.ops import has_kernel
from steplaw.ops.adamw import SCHEMA, reference_fused_adamw_


def op_args(device="cpu", dtype=torch.float32, amsgrad=False, master=False, shapes=((5, 7), (0,), (33,)),
            grad_scale=None, found_inf=None, seed=0, members=None):
    """The op's arguments. With `members` (one K per shape; shapes then lead with K) the
    hparams table holds the two plain rows and then, per stacked param, K member rows
    with lrs of their own; member 1 of the first stacked param is frozen (lr 0) and gets
    NaN/inf gradients, which must touch nothing."""
    g = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(shape, dt):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)

    params = [rand(s, dtype) for s in shapes]
    grads = [rand(s, dtype) for s in shapes]
    exp_avgs = [rand(s, state_dtype) * 0.1 for s in shapes]
    exp_avg_sqs = [rand(s, state_dtype).abs() * 0.01 for s in shapes]
    max_sqs = [t * 1.5 for t in exp_avg_sqs] if amsgrad else []
    masters = [p.float() for p in params] if master else []
    steps = [torch.full((), float(k + 1), device=device) for k in range(len(shapes))]
    rows = [[1e-2, 0.9, 0.999, 1e-2, 1e-8, 0.0, 0.0], [3e-3, 0.3, 0.99, 0.0, 1e-6, 1.0, 0.0]]
    group_index = [k % 2 for k in range(len(shapes))]
    frozen_done = False
    for i, k in enumerate(members or []):
        if k == 1 and not members_stacked_k1(shapes[i], k):
            continue
        group_index[i] = len(rows)
        for member in range(k):
            lr = 1e-2 * (member + 1) / k
            if member == 1 and not frozen_done:
                lr = 0.0
                grads[i][1] = float("nan")
                grads[i][1].view(-1)[:1] = float("inf")
            rows.append([lr, 0.9, 0.95, 0.1 * member, 1e-8, float(member % 2), 1.0])
        frozen_done = frozen_done or k > 1
    hparams = torch.tensor(rows, dtype=torch.float64, device=device)
    # The CUDA kernel reads grad_scale / found_inf on the device (as torch's fused AdamW).
    grad_scale = None if grad_scale is None else grad_scale.to(device)
    found_inf = None if found_inf is None else found_inf.to(device)
    return (params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, steps, hparams, group_index, amsgrad,
            grad_scale, found_inf, members)


def members_stacked_k1(shape, k):
    """A K = 1 stack (a 1-D lr of one value) is stacked too: a leading dimension of 1."""
    return k == 1 and len(shape) >= 1 and shape[0] == 1


def clone_args(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                 else (a.clone() if isinstance(a, torch.Tensor) else a) for a in args)


def test_schema_matches_python_copy():
    schema = str(torch.ops.steplaw.fused_adamw_.default._schema)
    assert schema == "steplaw::fused_adamw_" + SCHEMA


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_opcheck(amsgrad, dtype, master):
    args = op_args(dtype=dtype, amsgrad=amsgrad, master=master)
    torch.library.opcheck(torch.ops.steplaw.fused_adamw_.default, args)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_opcheck_stacked(dtype, master):
    args = op_args(dtype=dtype, master=master, amsgrad=True, shapes=((3, 5, 7), (1, 9), (16, 5), (6,)),
                   members=[3, 1, 16, 1])
    torch.library.opcheck(torch.ops.steplaw.fused_adamw_.default, args)


def test_opcheck_with_grad_scaler_tensors():
    args = op_args(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    torch.library.opcheck(torch.ops.steplaw.fused_adamw_.default, args)


# Members of several CPU chunks (2^18) and CUDA blocks (2^16), tiny members (many per
# chunk), a K = 1 stack, an empty param, and a plain param in the same call.
STACKED = dict(shapes=((3, 5, 7), (4, 70_001), (2, 270_001), (1, 9), (16, 5), (2, 0, 4), (6,)),
               members=[3, 4, 2, 1, 16, 2, 1])
CASES = {
    "fp32": dict(),
    "fp32_stacked_amsgrad": dict(amsgrad=True, **STACKED),
    "bf16_stacked_master_scaled": dict(dtype=torch.bfloat16, master=True, grad_scale=torch.tensor(4.0), **STACKED),
    "fp64_stacked": dict(dtype=torch.float64, **STACKED),
    "fp32_amsgrad_scaled": dict(amsgrad=True, grad_scale=torch.tensor(8.0)),
    "fp64": dict(dtype=torch.float64),
    "bf16_master": dict(dtype=torch.bfloat16, master=True),
    "fp16": dict(dtype=torch.float16),
}


def _compare(device, case):
    kernel_args = op_args(device=device, **CASES[case])
    reference_args = clone_args(kernel_args)
    torch.ops.steplaw.fused_adamw_(*kernel_args)
    reference_fused_adamw_(*reference_args)
    _assert_matches(device, kernel_args, reference_args)


def _assert_matches(device, kernel_args, reference_args):
    dtype = kernel_args[0][0].dtype
    for got_list, want_list in zip(kernel_args[:7], reference_args[:7]):
        for got, want in zip(got_list, want_list):
            if dtype == torch.float32 and device == "cpu":
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
            elif dtype in (torch.float32, torch.float64):
                # float64: the reference rounds a*b+c twice where the kernel uses fma;
                # CUDA: the kernel's pow/sqrt of the coefficients may differ in the last bit.
                torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7,
                                           equal_nan=True)
            else:
                torch.testing.assert_close(got.float(), want.float(), rtol=5e-3, atol=5e-3, equal_nan=True)


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_reference(case):
    assert has_kernel("fused_adamw_", "cpu"), "the C++ CPU kernel was not built"
    _compare("cpu", case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernel_matches_reference(case):
    assert has_kernel("fused_adamw_", "cuda"), "the CUDA kernel was not built"
    _compare("cuda", case)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_frozen_member_is_untouched_by_its_nan_grads(device, impl):
    args = op_args(device=device, amsgrad=True, **STACKED)
    before = clone_args(args)
    (torch.ops.steplaw.fused_adamw_ if impl == "kernel" else reference_fused_adamw_)(*args)
    for which in (0, 2, 3, 4, 5):  # params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters
        if args[which]:  # param 0, member 1
            assert torch.equal(args[which][0][1], before[which][0][1])
    for got, want in zip(args[0], before[0]):
        if got.numel():
            assert torch.isfinite(got).all()
            assert not torch.equal(got, want)


def _misaligned(t, offset=1):
    """The same values in a view whose data pointer is `offset` elements past an allocation."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset:].view(t.shape)
    view.copy_(t)
    return view


def _run_cuda_against_reference(kernel_args, misalign):
    """The CUDA kernel on `kernel_args` (tensors moved off 16-byte alignment when
    `misalign`) against the reference on a copy."""
    if misalign:
        kernel_args = tuple([_misaligned(t, 1 + i % 3) for i, t in enumerate(a)]
                            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) and a[0].dim() > 0
                            else a for a in kernel_args)
    reference_args = clone_args(kernel_args)
    torch.ops.steplaw.fused_adamw_(*kernel_args)
    reference_fused_adamw_(*reference_args)
    _assert_matches("cuda", kernel_args, reference_args)


# CUDA table limits (csrc/common/multi_tensor.cuh): 110 tensors, 1280 chunks of 65536.
_CHUNK = 65536


@pytest.mark.gpu
@pytest.mark.parametrize("name,shapes,misalign", [
    # more tensors than one table holds, several of them multi-chunk with ragged tails
    ("many_tensors", [(k * 37 + 1,) for k in range(100)] + [(3 * _CHUNK + 5,), (0,), (2 * _CHUNK,)] * 6
     + [(7, 9)] * 5, False),
    # a tensor larger than one table's 1280 chunks continues in the next table
    ("table_overflow", [(5,), (1281 * _CHUNK + 3,), (11,)], False),
    # data pointers not 16-byte aligned: the scalar path of every chunk
    ("misaligned", [(_CHUNK + 9,), (33,), (4, 4)], True),
])
@pytest.mark.parametrize("dtype,master,amsgrad", [(torch.float32, False, True), (torch.bfloat16, True, False),
                                                  (torch.float16, False, True)])
def test_cuda_table_limits_and_alignment(name, shapes, misalign, dtype, master, amsgrad):
    if name == "table_overflow" and dtype != torch.float32:
        pytest.skip("one dtype is enough for the 84M-element case")
    kernel_args = op_args(device="cuda", dtype=dtype, master=master, amsgrad=amsgrad, shapes=shapes,
                          grad_scale=torch.tensor(4.0))
    _run_cuda_against_reference(kernel_args, misalign)


@pytest.mark.gpu
@pytest.mark.parametrize("misalign", [False, True])
def test_cuda_stacked_members_across_chunks_and_tables(misalign):
    """Members of many blocks, tiny members, and a stacked tensor of 2 x 651 blocks that
    runs past one table's 1280 blocks (it continues in the next table mid-tensor)."""
    shapes = [(16, 70_001), (64, 3), (3, 5 * _CHUNK + 7), (2, 651 * _CHUNK + 1), (33,)]
    kernel_args = op_args(device="cuda", amsgrad=True, shapes=shapes, members=[16, 64, 3, 2, 1],
                          grad_scale=torch.tensor(4.0))
    _run_cuda_against_reference(kernel_args, misalign)


@pytest.mark.gpu
def test_cuda_strided_params_are_staged_and_written_back():
    args = op_args(device="cuda", shapes=((6, 10), (9, 4)), amsgrad=True)
    strided = [torch.zeros(6, 20, device="cuda")[:, ::2], torch.zeros(4, 9, device="cuda").t()]
    for view, value in zip(strided, args[0]):
        view.copy_(value)
    kernel_args = (strided,) + args[1:]
    reference_args = clone_args(kernel_args)
    torch.ops.steplaw.fused_adamw_(*kernel_args)
    reference_fused_adamw_(*reference_args)
    _assert_matches("cuda", kernel_args, reference_args)


@pytest.mark.gpu
@pytest.mark.parametrize("which", [1, 5])
def test_cuda_rejects_host_grads_and_masters(which):
    args = list(op_args(device="cuda", dtype=torch.bfloat16, master=True))
    args[which] = [t.cpu() for t in args[which]]
    with pytest.raises(ValueError, match="device"):
        torch.ops.steplaw.fused_adamw_(*args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float64_params_with_master_weights_are_rejected(device):
    args = list(op_args(device=device, dtype=torch.float64))
    args[2] = [t.float() for t in args[2]]  # master weights make the state float32
    args[3] = [t.float() for t in args[3]]
    args[5] = [p.float() for p in args[0]]
    with pytest.raises(ValueError, match="float64"):
        torch.ops.steplaw.fused_adamw_(*args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_found_inf_changes_nothing(device):
    args = op_args(device=device, amsgrad=True, grad_scale=torch.tensor(2.0, device=device),
                   found_inf=torch.tensor(1.0, device=device))
    before = clone_args(args)
    torch.ops.steplaw.fused_adamw_(*args)
    for got_list, want_list in zip(args[:7], before[:7]):
        for got, want in zip(got_list, want_list):
            assert torch.equal(got, want)


def test_steps_advance_including_empty_params():
    args = op_args()
    torch.ops.steplaw.fused_adamw_(*args)
    assert [float(s) for s in args[6]] == [2.0, 3.0, 4.0]


def test_grads_are_not_modified():
    args = op_args(grad_scale=torch.tensor(4.0))
    grads = [g.clone() for g in args[1]]
    torch.ops.steplaw.fused_adamw_(*args)
    for got, want in zip(args[1], grads):
        assert torch.equal(got, want)


def test_stacked_shape_and_rows_are_checked():
    args = list(op_args(shapes=((3, 4), (5,)), members=[3, 1]))
    args[12] = [2, 1]
    with pytest.raises(ValueError, match=r"param 0 of shape \[3, 4\] has 2 stacked members"):
        torch.ops.steplaw.fused_adamw_(*args)
    args = list(op_args(shapes=((3, 4), (5,)), members=[3, 1]))
    args[8] = [3, 0]  # rows 3..5 of a 5-row table
    with pytest.raises(ValueError, match="outside the 5 rows"):
        torch.ops.steplaw.fused_adamw_(*args)


@pytest.mark.parametrize("field,value", [(12, [2, 1]), (8, [3, 0]), (12, [0, 1])])
def test_kernel_and_reference_reject_bad_members_alike(field, value):
    args = list(op_args(shapes=((3, 4), (5,)), members=[3, 1]))
    args[field] = value
    with pytest.raises(ValueError) as kernel_error:
        torch.ops.steplaw.fused_adamw_(*clone_args(args))
    with pytest.raises(ValueError) as reference_error:
        reference_fused_adamw_(*clone_args(args))
    assert type(kernel_error.value) is type(reference_error.value)
    assert str(kernel_error.value) == str(reference_error.value)


def _replace(field, make):
    """A mutation of op_args: argument `field` becomes make(old value)."""
    def mutate(args):
        args[field] = make(args[field])
    return mutate


def _replace_first(field, make):
    """A mutation of op_args: the first tensor of list argument `field` becomes make(it)."""
    return _replace(field, lambda tensors: [make(tensors[0])] + tensors[1:])


# One mistake each (applied to op_args() of three fp32 params): csrc/adamw/adamw_common.h
# checks every one, and the reference must raise the same ValueError with the same text.
BAD_ARGS = {
    "grads short": _replace(1, lambda t: t[:-1]),
    "exp_avgs short": _replace(2, lambda t: t[:-1]),
    "exp_avg_sqs long": _replace(3, lambda t: t + t[:1]),
    "steps short": _replace(6, lambda t: t[:1]),
    "group_index short": _replace(8, lambda g: g[:2]),
    "members short": _replace(12, lambda m: [1]),
    "amsgrad without max": _replace(9, lambda a: True),
    "masters short": _replace(5, lambda m: [torch.zeros(5, 7)]),
    "hparams float32": _replace(7, lambda h: h.float()),
    "hparams 6 columns": _replace(7, lambda h: h[:, :6].contiguous()),
    "hparams transposed": _replace(7, lambda h: h.t().contiguous().t()),
    "group_index past rows": _replace(8, lambda g: [0, 2, 1]),
    "group_index negative": _replace(8, lambda g: [0, -1, 1]),
    "int param": _replace_first(0, lambda p: p.long()),
    "complex param": _replace_first(0, lambda p: torch.complex(p, p)),
    "grad float64": _replace_first(1, lambda g: g.double()),
    "grad shape": _replace_first(1, lambda g: g.reshape(7, 5)),
    "exp_avg float64": _replace_first(2, lambda m: m.double()),
    "exp_avg_sq shape": _replace_first(3, lambda v: v[:4]),
    "master float16": lambda args: args.__setitem__(5, [p.half() for p in args[0]]),
    "step float64": _replace_first(6, lambda s: s.double()),
    "step two elements": _replace_first(6, lambda s: torch.zeros(2)),
    "float64 param with masters": lambda args: _float64_with_masters(args),
}


def _float64_with_masters(args):
    args[5] = [p.float() for p in args[0]]
    args[0] = [p.double() for p in args[0]]
    args[1] = [g.double() for g in args[1]]


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_kernel_and_reference_reject_bad_args_alike(case):
    """Same ValueError, same sentence, from the CPU kernel and the reference (called
    directly: the op's dispatcher would pick the kernel), nothing written by either."""
    assert has_kernel("fused_adamw_", "cpu"), "the C++ CPU kernel was not built"
    args = list(op_args())
    BAD_ARGS[case](args)
    errors = []
    for impl in (torch.ops.steplaw.fused_adamw_, reference_fused_adamw_):
        call_args = clone_args(args)
        with pytest.raises(ValueError) as caught:
            impl(*call_args)
        errors.append(caught.value)
        for got, want in zip(call_args[0], args[0]):
            assert torch.equal(got, want)
    assert type(errors[0]) is type(errors[1]) is ValueError
    assert str(errors[0]) == str(errors[1]), [str(e) for e in errors]
    assert str(errors[0]).startswith("steplaw: ") and "\n" not in str(errors[0])


def test_mismatched_lists_are_rejected():
    args = list(op_args())
    args[2] = args[2][:-1]
    with pytest.raises(ValueError, match="one length"):
        torch.ops.steplaw.fused_adamw_(*args)
    args = list(op_args())
    args[8] = [0, 5, 1]
    with pytest.raises(ValueError, match="outside"):
        torch.ops.steplaw.fused_adamw_(*args)


def test_reference_fallback_without_extension():
    """Without steplaw._C the op is defined in Python on the reference, and FusedAdamW
    still matches torch's fused AdamW."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["steplaw._C"] = None  # the extension "fails to load"
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import steplaw.ops
        assert any("fused_adamw_" in str(w.message) for w in caught), [str(w.message) for w in caught]
        from steplaw.optim import FusedAdamW
        torch.manual_seed(0)
        a = [torch.randn(37, 5, requires_grad=True), torch.randn(0, requires_grad=True)]
        b = [p.detach().clone().requires_grad_() for p in a]
        oa, ob = FusedAdamW(a, lr=1e-2, amsgrad=True), torch.optim.AdamW(b, lr=1e-2, amsgrad=True, fused=True)
        for _ in range(5):
            for p, q in zip(a, b):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            oa.step()
            ob.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("env", [{"STEPLAW_CPU_PORTABLE": "1"}, {"STEPLAW_CPU_ISA": "portable"}, {"STEPLAW_CPU_ISA": "avx2"}])
def test_narrower_cpu_paths_match_reference(env):
    """The scalar path (CPUs without AVX2/FMA) and the AVX2 path (CPUs without AVX-512),
    forced on this machine, against the reference: every CPU path rounds alike."""
    import os
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import test_adamw_op as t\n"
        "for case in t.CASES: t._compare('cpu', case)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_every_cpu_path_gives_the_same_bits():
    """AVX-512, AVX2 and scalar kernels (whichever this CPU has) on ragged sizes, with
    amsgrad and a grad scale: identical parameters and state, bit for bit."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, steplaw.ops\n"
        "from steplaw.ops.adamw import fused_adamw_\n"
        "g = torch.Generator().manual_seed(0)\n"
        "sizes = [1, 7, 15, 16, 17, 33, 1000, 70001]\n"
        "ps = [torch.randn(n, generator=g) for n in sizes]\n"
        "gs = [torch.randn(n, generator=g) * 100 for n in sizes]\n"
        "ms = [torch.randn(n, generator=g) for n in sizes]\n"
        "vs = [torch.rand(n, generator=g) for n in sizes]\n"
        "vmax = [v.clone() for v in vs]\n"
        "steps = [torch.tensor(4.0) for _ in sizes]\n"
        "hp = torch.tensor([[1e-3, 0.9, 0.95, 0.1, 1e-8, 0.0, 0.0]], dtype=torch.float64)\n"
        "fused_adamw_(ps, gs, ms, vs, vmax, [], steps, hp, [0] * len(sizes), True, grad_scale=torch.tensor(64.0))\n"
        "torch.save([ps, ms, vs, vmax], __import__('sys').argv[1])\n"
    )
    out = {}
    for isa in ("", "avx2", "portable"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"steplaw_isa_{os.getpid()}_{isa or 'best'}.pt")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPLAW_CPU")}
        if isa:
            env["STEPLAW_CPU_ISA"] = isa
        result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        out[isa or "best"] = torch.load(path)
        os.remove(path)
    for name in ("avx2", "portable"):
        for a_list, b_list in zip(out["best"], out[name]):
            for a, b in zip(a_list, b_list):
                assert torch.equal(a, b), name
