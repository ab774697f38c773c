"""FusedAdamW against torch.optim.AdamW (for-loop and fused) and a float64 oracle."""
import copy

import pytest
import torch

from steplaw.errors import UserError
from steplaw.ops.adamw import reference_fused_adamw_
from steplaw.optim import FusedAdamW

STEPS = 20


def make_params(dtype=torch.float32, device="cpu", seed=0):
    """Leaf parameters covering the awkward cases: a large one (vector body + tail), a
    transposed (non-contiguous, dense) one, a strided view with gaps, a frozen one
    (never gets a gradient) and a 0-size last one."""
    g = torch.Generator().manual_seed(seed)
    raw = [
        torch.randn(67, 129, generator=g),
        torch.randn(9, 7, generator=g).t(),
        torch.randn(6, 10, generator=g)[:, ::2],
        torch.randn(5, generator=g),  # frozen
        torch.randn(0, 3, generator=g),
    ]
    return [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in raw]


FROZEN = 3
# torch's fused CPU AdamW (2.14) walks param memory in storage order, so it is wrong for
# a parameter with gaps (index 2); comparisons with it skip that one, which is checked
# against the for-loop AdamW and the float64 oracle instead.
GAPPED = 2


def fused_comparable(pairs):
    return [pair for index, pair in enumerate(pairs) if index != GAPPED]


def grads_for(params, step, seed=0, round_to=None):
    """Gradients of one step; `round_to` rounds them through a dtype first, so that an
    fp32 run sees exactly the gradients of a bf16/fp16 run."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for index, p in enumerate(params):
        if index == FROZEN:
            out.append(None)
        else:
            grad = torch.randn(p.shape, generator=g)
            if round_to is not None:
                grad = grad.to(round_to)
            out.append(grad.to(p.dtype).to(p.device))
    return out


def run(opt_factory, params, steps=STEPS, grad_layout=None, seed=0, round_to=None):
    opt = opt_factory(params)
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step, seed, round_to)):
            if g is not None and grad_layout == "transposed" and g.dim() == 2:
                g = g.t().contiguous().t()
            if g is not None and grad_layout == "like_param":
                # torch's fused CPU AdamW (2.14) walks param and grad memory in storage
                # order, so it is only right when their layouts match; FusedAdamW is right
                # either way (test_fp32_matches_torch_forloop... uses other layouts).
                g = torch.empty_like(p).copy_(g)
            p.grad = g
        opt.step()
    return opt


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


OPTIONS = {
    "default": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2, amsgrad=True),
    "maximize": dict(lr=1e-2, maximize=True),
    "no_decay": dict(lr=3e-3, weight_decay=0.0),
    "small_beta1": dict(lr=1e-2, betas=(0.3, 0.9)),  # lerp's second form (weight >= 0.5)
    "tensor_lr": dict(lr=torch.tensor(1e-2)),
    "big_eps_decay": dict(lr=1e-1, eps=1e-3, weight_decay=0.5),
}


def ulp_distance(a, b):
    ia = a.detach().contiguous().view(torch.int32).long()
    ib = b.detach().contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def memory_order(t):
    return t.detach().permute(*sorted(range(t.dim()), key=lambda d: -t.stride(d))).reshape(-1)


def assert_matches_torch_fused(ours, theirs):
    """Within 1 ulp, except in the last numel % 16 elements of a tensor: torch's kernel
    runs those in a scalar loop that rounds twice where its AVX512 body (and every
    steplaw path) uses one fma, so after 20 steps they may drift a few ulps apart."""
    a, b = memory_order(ours), memory_order(theirs)
    body = a.numel() - a.numel() % 16
    assert ulp_distance(a[:body], b[:body]) <= 1
    assert ulp_distance(a[body:], b[body:]) <= 8


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fp32_matches_torch_fused_within_one_ulp(name):
    kwargs = OPTIONS[name]
    ours, theirs = make_params(), make_params()
    opt = run(lambda ps: FusedAdamW(ps, **copy.deepcopy(kwargs)), ours)
    ref = run(lambda ps: torch.optim.AdamW(ps, fused=True, **copy.deepcopy(kwargs)), theirs, grad_layout="like_param")
    for p, q in fused_comparable(zip(ours, theirs)):
        assert_matches_torch_fused(p, q)
    for p, q in fused_comparable(zip(ours, theirs)):
        if q in ref.state:
            for key, value in ref.state[q].items():
                if key != "step":
                    assert_matches_torch_fused(opt.state[p][key], value)
                else:
                    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].dim() == 0
                    assert float(opt.state[p]["step"]) == float(value) == STEPS
    assert ours[FROZEN] not in opt.state  # no gradient, no state


@pytest.mark.parametrize("name", list(OPTIONS))
def test_fp32_matches_torch_forloop_and_float64_oracle(name):
    kwargs = OPTIONS[name]
    ours, theirs = make_params(), make_params()
    oracle = clone_params(ours, torch.float64)
    run(lambda ps: FusedAdamW(ps, **copy.deepcopy(kwargs)), ours, grad_layout="transposed")
    run(lambda ps: torch.optim.AdamW(ps, foreach=False, **copy.deepcopy(kwargs)), theirs)
    # The oracle: the pure-PyTorch reference on float64 copies (float64 state).
    oracle_kwargs = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    run(lambda ps: FusedAdamW(ps, **oracle_kwargs), oracle)
    for p, q, o in zip(ours, theirs, oracle):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.double(), o, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours[0], make_params()[0])  # it did train
    torch.testing.assert_close(ours[FROZEN], make_params()[FROZEN], rtol=0, atol=0)


def test_reference_op_is_the_kernel_math():
    """The pure-PyTorch reference (the fallback) and the compiled CPU kernel agree."""
    kernel_params, reference_params = make_params(), make_params()
    opt = run(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True), kernel_params)
    state = {}
    for step in range(STEPS):
        grads = grads_for(reference_params, step)
        live = [(p, g) for p, g in zip(reference_params, grads) if g is not None]
        if not state:
            state = {"m": [torch.zeros_like(p) for p, _ in live], "v": [torch.zeros_like(p) for p, _ in live],
                     "vmax": [torch.zeros_like(p) for p, _ in live], "step": [torch.zeros(()) for _ in live]}
        with torch.no_grad():
            reference_fused_adamw_(
                [p for p, _ in live], [g for _, g in live], state["m"], state["v"], state["vmax"], [],
                state["step"], opt._hparams(torch.device("cpu")), [0] * len(live), True)
    for p, q in zip(kernel_params, reference_params):
        assert ulp_distance(p, q) <= 1


def test_per_group_hyperparameters_in_one_step():
    def groups(ps):
        return [
            {"params": ps[:2], "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1},
            {"params": ps[2:], "lr": 3e-3, "amsgrad": True, "maximize": True, "eps": 1e-6},
        ]

    ours, theirs = make_params(), make_params()
    run(lambda ps: FusedAdamW(groups(ps)), ours)
    run(lambda ps: torch.optim.AdamW(groups(ps), fused=True), theirs, grad_layout="like_param")
    for p, q in fused_comparable(zip(ours, theirs)):
        assert_matches_torch_fused(p, q)


def test_lr_tensor_changed_in_place_is_used():
    ours, theirs = make_params(), make_params()
    lr_ours, lr_theirs = torch.tensor(1e-2), torch.tensor(1e-2)
    opt = FusedAdamW(ours, lr=lr_ours)
    ref = torch.optim.AdamW(theirs, lr=lr_theirs, fused=True)
    for step in range(6):
        for p, q, g in zip(ours, theirs, grads_for(ours, step)):
            g = None if g is None else torch.empty_like(p).copy_(g)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        ref.step()
        lr_ours.mul_(0.5)
        lr_theirs.mul_(0.5)
    for p, q in fused_comparable(zip(ours, theirs)):
        assert_matches_torch_fused(p, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype):
    ours = make_params(dtype)
    opt = run(lambda ps: FusedAdamW(ps, lr=1e-2), ours)
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.float32
    # Same semantics on the reference (fp32 state, param rounded every step).
    reference = make_params(dtype)
    state = None
    for step in range(STEPS):
        live = [(p, g) for p, g in zip(reference, grads_for(reference, step)) if g is not None]
        if state is None:
            state = [[torch.zeros_like(p, dtype=torch.float32) for p, _ in live] for _ in range(2)]
            steps = [torch.zeros(()) for _ in live]
        with torch.no_grad():
            reference_fused_adamw_([p for p, _ in live], [g for _, g in live], state[0], state[1], [], [],
                                   steps, opt._hparams(torch.device("cpu")), [0] * len(live), False)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p.float(), q.float(), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_fp32_adamw_exactly(dtype):
    ours = make_params(dtype)
    opt = run(lambda ps: FusedAdamW(ps, lr=1e-3, master_weights=True), ours)
    fp32 = clone_params(make_params(dtype), torch.float32)
    run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), fp32, grad_layout="like_param", round_to=dtype)
    for index, (p, q) in enumerate(zip(ours, fp32)):
        if index in (FROZEN, GAPPED):
            continue
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_matches_torch_fused(master, q)
        torch.testing.assert_close(p.float(), q, rtol=5e-3, atol=5e-3)


def test_mixed_dtypes_in_one_group():
    def build():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(33, generator=g).to(dt).requires_grad_()
                for dt in (torch.float32, torch.bfloat16, torch.float64, torch.float16)]

    ours = build()
    opt = FusedAdamW(ours, lr=1e-2)
    singles = build()
    alone = [FusedAdamW([p], lr=1e-2) for p in singles]
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, singles):
            grad = torch.randn(33, generator=g).to(p.dtype)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        for o in alone:
            o.step()
    for p, q in zip(ours, singles):
        assert torch.equal(p, q)
    assert opt.state[ours[2]]["exp_avg"].dtype == torch.float64


def _scaler_run(optimizer_cls, inject_at, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = optimizer_cls(model.parameters(), lr=1e-2, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = torch.randn(STEPS, 4, 8, generator=torch.Generator().manual_seed(1))
    snapshots = {}
    for step in range(STEPS):
        opt.zero_grad()
        loss = model(data[step]).pow(2).mean()
        scaler.scale(loss).backward()
        if step == inject_at:
            model[0].weight.grad[0, 0] = float("inf")
            snapshots["before"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        scaler.step(opt)
        scaler.update()
        if step == inject_at:
            snapshots["after"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    return model, opt, snapshots


def test_grad_scaler_inf_step_changes_nothing_and_matches_torch():
    model, opt, snaps = _scaler_run(FusedAdamW, inject_at=7)
    assert opt._step_supports_amp_scaling
    (params_before, state_before), (params_after, state_after) = snaps["before"], snaps["after"]
    for key in params_before:
        assert torch.equal(params_before[key], params_after[key])
    for pid, state in state_before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_after["state"][pid][key]), key
    assert float(opt.state_dict()["state"][0]["step"]) == STEPS - 1
    for other in (dict(fused=True), dict(foreach=False)):
        ref_model, _, _ = _scaler_run(torch.optim.AdamW, inject_at=7, **other)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_continues_identically(direction, amsgrad):
    first, second = (torch.optim.AdamW, FusedAdamW) if direction == "torch_to_ours" else (FusedAdamW, torch.optim.AdamW)
    extra = {"foreach": False} if first is torch.optim.AdamW else {}
    params = make_params()
    opt = run(lambda ps: first(ps, lr=1e-2, amsgrad=amsgrad, **extra), params, steps=10, grad_layout="like_param")
    saved = copy.deepcopy(opt.state_dict())
    resumed = clone_params(params)
    opt2 = second(resumed, lr=1e-2, amsgrad=amsgrad)
    opt2.load_state_dict(saved)
    for step in range(10, 20):
        grads = grads_for(params, step)
        for p, q, g in zip(params, resumed, grads):
            g = None if g is None else torch.empty_like(p).copy_(g)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, resumed):
        if p in opt.state:
            assert float(opt.state[p]["step"]) == float(opt2.state[q]["step"]) == 20
            assert set(opt.state[p]) == set(opt2.state[q])


def test_master_weight_state_stays_fp32_across_save_and_load():
    params = make_params(torch.bfloat16)
    opt = run(lambda ps: FusedAdamW(ps, lr=1e-3, master_weights=True), params, steps=10)
    saved = copy.deepcopy(opt.state_dict())
    resumed = clone_params(params)
    opt2 = FusedAdamW(resumed, lr=1e-3, master_weights=True)
    opt2.load_state_dict(saved)
    for q in resumed:
        if q in opt2.state:
            for key in ("exp_avg", "exp_avg_sq", "master_param"):
                assert opt2.state[q][key].dtype == torch.float32, key
    for step in range(10, 20):
        for p, q, g in zip(params, resumed, grads_for(params, step)):
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        if p in opt.state:
            assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])
    # torch's AdamW accepts the same state_dict (it casts the state to bf16).
    torch_opt = torch.optim.AdamW(clone_params(params), lr=1e-3)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_defaults_and_group_keys_match_torch():
    p = [torch.zeros(3, requires_grad=True)]
    ours, theirs = FusedAdamW(p), torch.optim.AdamW(p)
    for key, value in theirs.defaults.items():
        assert ours.defaults[key] == value, key
    assert set(theirs.param_groups[0]) <= set(ours.param_groups[0])


def test_sparse_and_complex_gradients_are_rejected():
    sparse = torch.zeros(4, 3, requires_grad=True)
    sparse.grad = torch.eye(4, 3).to_sparse()
    with pytest.raises(UserError, match="sparse"):
        FusedAdamW([sparse]).step()
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    complex_param.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(UserError, match="complex"):
        FusedAdamW([complex_param]).step()


def test_bad_hyperparameters_are_user_errors():
    p = [torch.zeros(3, requires_grad=True)]
    for kwargs in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1),
                   dict(differentiable=True)):
        with pytest.raises(UserError):
            FusedAdamW(p, **kwargs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_training_step(backend):
    # The optimizer step is traced by dynamo with fullgraph=True and the custom mutating
    # op functionalized (aot_eager) and lowered (inductor, ~6 s on 2 cores). The backward
    # runs eagerly between the compiled forward and the compiled step (a .backward()
    # inside a fullgraph region is a graph break in torch itself).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    opt, opt_twin = FusedAdamW(model.parameters(), lr=1e-2), FusedAdamW(twin.parameters(), lr=1e-2)
    data = torch.randn(5, 4, 8)
    loss_fn = torch.compile(lambda x: model(x).pow(2).mean(), backend=backend, fullgraph=True)
    step_fn = torch.compile(opt.step, backend=backend, fullgraph=True)
    for x in data:
        opt.zero_grad()
        loss_fn(x).backward()
        step_fn()
        opt_twin.zero_grad()
        twin(x).pow(2).mean().backward()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(opt.state[next(model.parameters())]["step"]) == 5
    assert not torch.equal(model[0].weight, initial[0].weight)


def test_large_step_takes_the_parallel_path_and_matches_torch_fused():
    # > 2^18 elements in all: the CPU kernel splits the chunks over the thread pool.
    g = torch.Generator().manual_seed(5)
    # 600_001 elements span three kernel tasks of 2^18, the others one each.
    ours = [torch.randn(n, generator=g).requires_grad_() for n in (600_001, 70_001, 16_384 * 3 + 5)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt, ref = FusedAdamW(ours, lr=1e-2, amsgrad=True), torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, fused=True)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert_matches_torch_fused(p, q)
        assert_matches_torch_fused(opt.state[p]["max_exp_avg_sq"], ref.state[q]["max_exp_avg_sq"])


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1e-3, r"lr=-0.001"), ("lr", float("nan"), r"lr=nan"), ("lr", float("inf"), r"lr=inf"),
    ("eps", -1.0, r"eps=-1.0"), ("betas", (0.9, 1.0), r"betas\[1\]=1.0"), ("betas", (-0.1, 0.9), r"betas\[0\]=-0.1"),
    ("weight_decay", float("nan"), r"weight_decay=nan"), ("weight_decay", -0.1, r"weight_decay=-0.1"),
    # CPU tensors are read at each step too (host memory: no sync)
    ("lr", torch.tensor(-1.0), r"lr=-1.0"), ("lr", torch.tensor(float("nan"), dtype=torch.float64), r"lr=nan"),
    ("weight_decay", torch.tensor(-0.5), r"weight_decay=-0.5"),
])
def test_group_values_changed_after_construction_are_checked_at_the_step(key, value, match):
    """Checked on the host at the next step (float values only: no device sync), before
    anything is updated, with the group named."""
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = FusedAdamW([{"params": [p]}, {"params": [q]}], lr=1e-3)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[1][key] = value
    with pytest.raises(UserError, match=r"param group 1: " + match):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_cpu_lr_tensor_changed_in_place_is_checked_at_the_step():
    p = torch.zeros(3, requires_grad=True)
    lr = torch.tensor(1e-3)
    opt = FusedAdamW([p], lr=lr)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone()
    lr.fill_(-1.0)
    with pytest.raises(UserError, match=r"param group 0: lr=-1.0"):
        opt.step()
    assert torch.equal(p.detach(), before)
