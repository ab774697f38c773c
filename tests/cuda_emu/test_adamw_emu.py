"""The CUDA fused AdamW kernel (csrc/adamw/adamw_cuda.cu) and its multi-tensor launch code
(chunk tables, csrc/common/multi_tensor.cuh), run on the CPU through the emulation in
several block/thread orders, against the PyTorch reference and the C++ CPU kernel, on the
cases of tests/ops/test_adamw_op.py and the table limits; the same errors for bad input."""
import pytest
import torch
from conftest import load_test_module

from steplaw.ops.adamw import reference_fused_adamw_

pytestmark = pytest.mark.cuda_emu
adamw_tests = load_test_module("ops/test_adamw_op.py")
_CHUNK = 65536  # elements per CUDA block (csrc/common/multi_tensor.cuh)


def run_and_compare(emu, kernel_args):
    """The emulated kernel on kernel_args, the reference and the CPU kernel on copies."""
    reference_args = adamw_tests.clone_args(kernel_args)
    cpu_args = adamw_tests.clone_args(kernel_args)
    emu.fused_adamw_(*kernel_args)
    reference_fused_adamw_(*reference_args)
    torch.ops.steplaw.fused_adamw_(*cpu_args)
    # Tolerances of the CUDA comparison of tests/ops/test_adamw_op.py (the emulated kernel
    # uses the CUDA path's arithmetic, not the CPU kernel's SIMD lanes).
    adamw_tests._assert_matches("cuda", kernel_args, reference_args)
    adamw_tests._assert_matches("cuda", kernel_args, cpu_args)


def _with_misaligned(args):
    return tuple([adamw_tests._misaligned(t, 1 + i % 3) for i, t in enumerate(a)]
                 if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) and a[0].dim() > 0 else a
                 for a in args)


# The op test module's cases whose stacked params span several blocks are scaled down to
# stay within the emulation's budget, keeping their structure (members across blocks).
SMALL_STACKED = dict(shapes=((3, 5, 7), (2, _CHUNK + 3), (1, 9), (16, 5), (2, 0, 4), (6,)),
                     members=[3, 2, 1, 16, 2, 1])


def _case(name):
    case = dict(adamw_tests.CASES[name])
    if "members" in case:
        case.update(SMALL_STACKED)
    return case


@pytest.mark.parametrize("name", list(adamw_tests.CASES))
def test_kernel_matches_reference_and_cpu(emu, name):
    run_and_compare(emu, adamw_tests.op_args(**_case(name)))


@pytest.mark.parametrize("dtype,master,amsgrad,misalign", [(torch.float32, False, True, False),
                                                           (torch.bfloat16, True, False, True),
                                                           (torch.float16, False, True, True)])
def test_chunks_and_tensor_tables(emu, dtype, master, amsgrad, misalign):
    """More tensors than one table holds (110), multi-chunk tensors with ragged tails,
    empty tensors; misaligned: the scalar path of every chunk."""
    shapes = [(k * 3 + 1,) for k in range(112)] + [(2 * _CHUNK + 5,), (0,), (7, 9)]
    args = adamw_tests.op_args(dtype=dtype, master=master, amsgrad=amsgrad, shapes=shapes,
                               grad_scale=torch.tensor(4.0))
    run_and_compare(emu, _with_misaligned(args) if misalign else args)


def test_stacked_tensor_continues_in_the_next_table(emu):
    """A stacked param of 1300 tiny members is 1300 blocks: past one table's 1280 it
    continues in the next table mid-tensor (the table's slot-0 carry-over)."""
    args = adamw_tests.op_args(amsgrad=True, shapes=((5,), (1300, 3), (11,)), members=[1, 1300, 1],
                               grad_scale=torch.tensor(2.0))
    run_and_compare(emu, args)


def test_strided_params_are_staged_and_written_back(emu):
    args = adamw_tests.op_args(shapes=((6, 8), (5,)))
    params = [args[0][0].t(), args[0][1]]  # a transposed (non-contiguous) param
    grads = [args[1][0].t().contiguous(), args[1][1]]
    args = (params, grads) + args[2:]
    args = (args[0], args[1], [t.t().contiguous() if t.dim() == 2 else t for t in args[2]],
            [t.t().contiguous() if t.dim() == 2 else t for t in args[3]]) + args[4:]
    run_and_compare(emu, args)


def test_found_inf_changes_nothing(emu):
    args = adamw_tests.op_args(found_inf=torch.tensor(1.0))
    before = adamw_tests.clone_args(args)
    emu.fused_adamw_(*args)
    for got_list, want_list in zip(args[:7], before[:7]):
        for got, want in zip(got_list, want_list):
            assert torch.equal(got, want)


def test_frozen_member_is_untouched_by_its_nan_grads(emu):
    args = adamw_tests.op_args(amsgrad=True, **SMALL_STACKED)
    before = adamw_tests.clone_args(args)
    emu.fused_adamw_(*args)
    for which in (0, 2, 3, 4):
        assert torch.equal(args[which][0][1], before[which][0][1])
    for got in args[0]:
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", ["float64_master", "int_params", "group_out_of_range", "grad_shape", "state_dtype",
                                  "lengths", "members_dim"])
def test_bad_input_raises_what_the_cpu_kernel_raises(emu_ops, name):
    args = list(adamw_tests.op_args(shapes=((4, 3), (5,))))
    if name == "float64_master":
        args = list(adamw_tests.op_args(dtype=torch.float64, shapes=((4, 3),)))
        args[5] = [args[0][0].float()]
    elif name == "int_params":
        args[0] = [torch.zeros(4, 3, dtype=torch.int32), args[0][1]]
    elif name == "group_out_of_range":
        args[8] = [0, 5]
    elif name == "grad_shape":
        args[1] = [torch.zeros(3, 4), args[1][1]]
    elif name == "state_dtype":
        args[2] = [args[2][0].double(), args[2][1]]
    elif name == "lengths":
        args[1] = args[1][:1]
    elif name == "members_dim":
        args[12] = [3, 1]
    with pytest.raises(ValueError) as cpu_error:
        torch.ops.steplaw.fused_adamw_(*adamw_tests.clone_args(args))
    with pytest.raises(ValueError) as emu_error:
        emu_ops.fused_adamw_(*args)
    assert str(emu_error.value) == str(cpu_error.value)
