"""The emulation itself (tests/cuda_emu/emu): kernels with known faults, in module.cpp, must
give wrong answers or raise, and correct ones the right answer, in every order."""
import pytest

pytestmark = pytest.mark.cuda_emu


def test_correct_kernels_give_the_right_answer(emu):
    assert emu._selftest("block_sum") == sum(range(1, 129))
    assert emu._selftest("warp_sum") == sum(range(1, 33))


def test_a_missing_barrier_or_reduction_step_gives_a_wrong_answer(emu_ops):
    """Without its barrier, thread 0 sums before some others wrote (their slots hold the
    order's poison): wrong in some orders (in the reverse order thread 0 runs last and the
    sum comes out right, which is why every comparison runs in several orders)."""
    from conftest import ORDERS

    sums = []
    for order, seed in ORDERS:
        emu_ops._set_order(order, seed)
        sums.append(emu_ops._selftest("block_sum_no_barrier"))
        assert emu_ops._selftest("warp_sum_short") != sum(range(1, 33))
    emu_ops._set_order("forward", 0)
    assert any(s != sum(range(1, 129)) for s in sums)


@pytest.mark.parametrize("which,message", [
    ("shared_race", "shared-memory race: threads"),
    ("divergent_barrier", "wait at different __syncthreads: .*module.cpp:\\d+ and .*module.cpp:\\d+"),
    ("divergent_warp", "wait at different warp operations: .*module.cpp:\\d+ and .*module.cpp:\\d+"),
    ("early_exit_barrier", "reached by 7 of 8 threads"),
    ("partial_warp", "lane \\d+ of its mask has already returned|for lanes of its mask that returned"),
    ("assert", "device-side assert triggered: in\\[threadIdx.x\\] >= 0"),
    ("empty_grid", "invalid configuration argument"),
    ("big_smem", "65536 bytes of dynamic shared memory"),
])
def test_faults_raise(emu, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu._selftest(which)
