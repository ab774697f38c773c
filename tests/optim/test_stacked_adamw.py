"""FusedAdamW on stacked parameters (K runs as one model, per-member lr and weight decay)
against K separate optimizers, frozen members, shape errors and state_dict round trips."""
import copy

import pytest
import torch

from steplaw.errors import UserError
from steplaw.optim import FusedAdamW

K = 4
LRS = [1e-2, 3e-3, 3e-2, 1e-3]
WDS = [0.1, 0.0, 0.05, 0.3]
STEPS = 8


def stacked_params(dtypes=(torch.float32,), device="cpu", seed=0, members=K):
    """Leading member dimension of size `members`; awkward layouts: a member-major view
    that is not contiguous (inner dims transposed), a param whose members are NOT
    contiguous blocks (the kernel stages it), a 1-D one (one value per member), a large
    one (SIMD body + tail, several CPU chunks per member) and an empty one."""
    g = torch.Generator().manual_seed(seed)
    raw = [
        torch.randn(members, 13, 7, generator=g),
        torch.randn(members, 9, 7, generator=g).transpose(1, 2),
        torch.randn(11, members, generator=g).t(),
        torch.randn(members, generator=g),
        torch.randn(members, 70_001, generator=g),
        torch.randn(members, 0, 3, generator=g),
    ]
    out = []
    for index, t in enumerate(raw):
        dtype = dtypes[index % len(dtypes)]
        out.append(t.to(device=device, dtype=dtype).detach().requires_grad_())
    return out


def member_slices(params, k):
    return [p.detach()[k].clone(memory_format=torch.contiguous_format).requires_grad_() for p in params]


def grads(params, step, seed=0, nan_member=None):
    g = torch.Generator().manual_seed(100 * seed + step)
    out = []
    for p in params:
        grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        if nan_member is not None and grad.numel():
            grad[nan_member] = float("nan")
            grad[nan_member].view(-1)[:1] = float("inf")
        out.append(grad)
    return out


def run_stacked(params, steps=STEPS, lr=None, weight_decay=None, nan_member=None, **kwargs):
    device = params[0].device
    lr = torch.tensor(LRS, dtype=torch.float32, device=device) if lr is None else lr
    opt = FusedAdamW(params, lr=lr, weight_decay=list(WDS) if weight_decay is None else weight_decay, **kwargs)
    for step in range(steps):
        for p, grad in zip(params, grads(params, step, nan_member=nan_member)):
            p.grad = grad
        opt.step()
    return opt


def run_separate(params, optimizer, steps=STEPS, lrs=None, members=range(K), **kwargs):
    """Member k of `params`, trained alone by optimizer(lr=lrs[k], weight_decay=WDS[k])."""
    lrs = [float(torch.tensor(x, dtype=torch.float32)) for x in LRS] if lrs is None else lrs
    out = []
    for k in members:
        singles = member_slices(params, k)
        opt = optimizer(singles, lr=lrs[k], weight_decay=WDS[k], **kwargs)
        for step in range(steps):
            for single, grad in zip(singles, grads(params, step)):
                single.grad = grad[k].clone()
            opt.step()
        out.append((singles, opt))
    return out


def assert_state_equal(stacked_opt, stacked, k, single_opt, singles):
    for p, q in zip(stacked, singles):
        assert torch.equal(p.detach()[k], q.detach())
        if q.numel() == 0:
            continue
        for key, value in single_opt.state[q].items():
            if key != "step":
                assert torch.equal(stacked_opt.state[p][key][k], value), key


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"maximize": True, "betas": (0.3, 0.9)},
                                     {"eps": 1e-3, "amsgrad": True}])
def test_stacked_equals_k_separate_runs_bitwise(options):
    """Same math per element: each member ends bit for bit as the same run alone."""
    stacked = stacked_params()
    opt = run_stacked(stacked, **options)
    for k, (singles, single_opt) in enumerate(run_separate(stacked_params(), FusedAdamW, **options)):
        assert_state_equal(opt, stacked, k, single_opt, singles)
    assert not torch.equal(stacked[0].detach(), stacked_params()[0].detach())  # it did train


@pytest.mark.parametrize("options", [{}, {"amsgrad": True}])
def test_stacked_matches_torch_adamw_per_member(options):
    """Each member against torch.optim.AdamW (for-loop and fused) with its own lr/wd."""
    stacked = stacked_params()
    run_stacked(stacked, **options)
    for impl in (dict(foreach=False), dict(fused=True)):
        for k, (singles, _) in enumerate(run_separate(stacked_params(), torch.optim.AdamW, **options, **impl)):
            for p, q in zip(stacked, singles):
                # fused=True walks storage order: member slices are contiguous like their grads.
                torch.testing.assert_close(p.detach()[k], q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("master", [False, True])
def test_stacked_mixed_dtypes_equal_separate_runs(master):
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.float64)
    stacked = stacked_params(dtypes)
    if master:  # master weights are for bf16/fp16/fp32 params only
        stacked = [p for p in stacked if p.dtype != torch.float64]
    opt = run_stacked(stacked, master_weights=master)
    for p in stacked:
        if p.numel():
            want = torch.float64 if p.dtype == torch.float64 else torch.float32
            assert opt.state[p]["exp_avg"].dtype == want
    separate = stacked_params(dtypes)
    if master:
        separate = [p for p in separate if p.dtype != torch.float64]
    for k, (singles, single_opt) in enumerate(run_separate(separate, FusedAdamW, master_weights=master)):
        assert_state_equal(opt, stacked, k, single_opt, singles)


def test_frozen_member_with_nan_grads_is_untouched_and_others_unaffected():
    frozen = 2
    stacked = stacked_params()
    lr = torch.tensor(LRS, dtype=torch.float32)
    opt = run_stacked(stacked, steps=3, lr=lr, amsgrad=True)
    before = {id(p): (p.detach().clone(), {key: v.clone() for key, v in opt.state[p].items() if key != "step"})
              for p in stacked}
    lr[frozen] = 0.0  # the trainer's in-place update: member 2 diverged
    for step in range(3, 8):
        for p, grad in zip(stacked, grads(stacked, step, nan_member=frozen)):
            p.grad = grad
        opt.step()
    for p in stacked:
        old_param, old_state = before[id(p)]
        assert torch.equal(p.detach()[frozen], old_param[frozen])
        for key, value in old_state.items():
            assert torch.equal(opt.state[p][key][frozen], value[frozen]), key
    # The others end exactly as a stack without member 2 (its NaNs reached nothing).
    keep = [k for k in range(K) if k != frozen]
    without = [p.detach()[keep].clone().requires_grad_() for p in stacked_params()]
    opt3 = FusedAdamW(without, lr=torch.tensor([LRS[k] for k in keep]), weight_decay=[WDS[k] for k in keep],
                      amsgrad=True)
    for step in range(8):
        for p, grad in zip(without, grads(stacked, step)):
            p.grad = grad[keep].clone()
        opt3.step()
    for p, q in zip(stacked, without):
        assert torch.equal(p.detach()[keep], q.detach())
        assert torch.isfinite(p.detach()[keep]).all()


def test_frozen_member_from_the_start_and_float_weight_decay():
    stacked = stacked_params()
    initial = [p.detach().clone() for p in stacked]
    lr = torch.tensor([0.0] + LRS[1:])
    run_stacked(stacked, lr=lr, weight_decay=0.1, nan_member=0)
    for p, q in zip(stacked, initial):
        assert torch.equal(p.detach()[0], q[0])
        if p.numel():
            assert not torch.equal(p.detach()[1], q[1])


def test_unstacked_lr_zero_still_moves_the_moments_as_torch():
    """Freezing is for stacked members only: a plain group at lr 0 behaves as torch's AdamW."""
    p, q = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    q.data.copy_(p.data)
    ours, theirs = FusedAdamW([p], lr=0.0), torch.optim.AdamW([q], lr=0.0)
    p.grad, q.grad = torch.ones(5), torch.ones(5)
    ours.step()
    theirs.step()
    assert torch.equal(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"])
    assert ours.state[p]["exp_avg"].abs().sum() > 0


def test_lr_updated_in_place_is_used_each_step():
    stacked = stacked_params()
    lr = torch.tensor(LRS, dtype=torch.float64)
    opt = FusedAdamW(stacked, lr=lr, weight_decay=list(WDS))
    schedule = [1.0, 0.5, 0.25, 0.75]
    for step, mult in enumerate(schedule):
        opt.param_groups[0]["lr"].copy_(torch.tensor(LRS, dtype=torch.float64) * mult)
        for p, grad in zip(stacked, grads(stacked, step)):
            p.grad = grad
        opt.step()
    for k in range(K):
        singles = member_slices(stacked_params(), k)
        single = torch.optim.AdamW(singles, lr=LRS[k], weight_decay=WDS[k], foreach=False)
        for step, mult in enumerate(schedule):
            single.param_groups[0]["lr"] = LRS[k] * mult
            for s, grad in zip(singles, grads(stacked, step)):
                s.grad = grad[k].clone()
            single.step()
        for p, s in zip(stacked, singles):
            torch.testing.assert_close(p.detach()[k], s.detach(), rtol=1e-6, atol=1e-7)


def test_grad_scaler_tensors_with_stacked_groups():
    stacked, twin = stacked_params(), stacked_params()
    opt, opt_twin = run_stacked(stacked, steps=2), run_stacked(twin, steps=2)
    snapshot = [p.detach().clone() for p in stacked]
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    for p in stacked:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()  # skipped: found_inf
    assert all(torch.equal(p.detach(), q) for p, q in zip(stacked, snapshot))
    opt.found_inf = torch.tensor(0.0)
    for p, q, grad in zip(stacked, twin, grads(stacked, 9)):
        p.grad, q.grad = grad * 8, grad
    opt.step()
    opt_twin.step()
    for p, q in zip(stacked, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_shape_errors_name_the_shapes():
    with pytest.raises(UserError, match=r"shape \(3, 5\).*4 stacked members"):
        FusedAdamW([torch.zeros(3, 5, requires_grad=True)], lr=torch.full((4,), 1e-3))
    with pytest.raises(UserError, match=r"shape \(\).*2 stacked members"):
        FusedAdamW([torch.zeros((), requires_grad=True)], weight_decay=[0.1, 0.2])
    with pytest.raises(UserError, match="lr has 2 values and weight_decay 3"):
        FusedAdamW([torch.zeros(2, requires_grad=True)], lr=torch.ones(2) * 1e-3, weight_decay=[0.1, 0.2, 0.3])
    with pytest.raises(UserError, match=r"lr of shape \(2, 2\)"):
        FusedAdamW([torch.zeros(2, requires_grad=True)], lr=torch.ones(2, 2) * 1e-3)
    with pytest.raises(UserError, match=r"lr=-0.5"):
        FusedAdamW([torch.zeros(2, requires_grad=True)], lr=torch.tensor([1e-3, -0.5]))
    with pytest.raises(UserError, match=r"weight_decay=nan"):
        FusedAdamW([torch.zeros(2, requires_grad=True)], weight_decay=[0.1, float("nan")])
    # A parameter added to a stacked group later, or a swapped lr tensor, fails at the step.
    p = torch.zeros(2, 3, requires_grad=True)
    opt = FusedAdamW([p], lr=torch.full((2,), 1e-3))
    opt.param_groups[0]["lr"] = torch.full((3,), 1e-3)
    p.grad = torch.ones(2, 3)
    with pytest.raises(UserError, match=r"param group 0: parameter of shape \(2, 3\).*3 stacked members"):
        opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_keeps_the_trainers_lr_tensor(amsgrad):
    stacked = stacked_params()
    opt = run_stacked(stacked, steps=4, amsgrad=amsgrad)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in stacked]
    held_lr = torch.zeros(K)
    opt2 = FusedAdamW(resumed, lr=held_lr, weight_decay=[0.0] * K, amsgrad=amsgrad)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] is held_lr
    assert torch.equal(held_lr, torch.tensor(LRS, dtype=torch.float32))
    assert opt2.param_groups[0]["weight_decay"].tolist() == WDS
    for step in range(4, 8):
        for p, q, grad in zip(stacked, resumed, grads(stacked, step)):
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        opt2.step()
    for p, q in zip(stacked, resumed):
        assert torch.equal(p, q)
        if p.numel():
            assert set(opt.state[p]) == set(opt2.state[q])
            for key in opt.state[p]:
                assert torch.equal(opt.state[p][key], opt2.state[q][key]), key
