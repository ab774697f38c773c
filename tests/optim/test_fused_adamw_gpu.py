"""FusedAdamW on CUDA against torch's fused CUDA AdamW (run by `make gpu-check`)."""
import copy

import pytest
import torch

from steplaw.optim import FusedAdamW

# pytest (rootdir import mode "prepend") puts this folder on sys.path.
from test_fused_adamw import OPTIONS, STEPS, clone_params, make_params, run

pytestmark = pytest.mark.gpu


def cuda_params(dtype=torch.float32):
    return [p.detach().to("cuda").requires_grad_() for p in make_params(dtype)]


def _cuda_options(kwargs):
    out = copy.deepcopy(kwargs)
    if isinstance(out.get("lr"), torch.Tensor):
        out["lr"] = out["lr"].cuda()
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_torch_fused_cuda(name):
    ours, theirs = cuda_params(), cuda_params()
    run(lambda ps: FusedAdamW(ps, **_cuda_options(OPTIONS[name])), ours)
    run(lambda ps: torch.optim.AdamW(ps, fused=True, **_cuda_options(OPTIONS[name])), theirs,
        grad_layout="like_param")
    for index, (p, q) in enumerate(zip(ours, theirs)):
        if index == 2:  # torch's fused kernel walks storage order; see test_fused_adamw.GAPPED
            continue
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_cuda_matches_cpu_kernel():
    """The same shared math on both devices: CPU and CUDA runs agree closely."""
    ours_cuda, ours_cpu = cuda_params(), make_params()
    run(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True), ours_cuda)
    run(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True), ours_cpu)
    for p, q in zip(ours_cuda, ours_cpu):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_cuda(dtype):
    ours = cuda_params(dtype)
    opt = run(lambda ps: FusedAdamW(ps, lr=1e-3, master_weights=True), ours)
    fp32 = clone_params(cuda_params(dtype), torch.float32)
    run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), fp32, grad_layout="like_param", round_to=dtype)
    for index, (p, q) in enumerate(zip(ours, fp32)):
        if index in (2, 3):
            continue
        torch.testing.assert_close(opt.state[p]["master_param"], q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_inf_step_is_skipped_without_sync():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    before = None
    for step in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(8, 64, device="cuda")).float().pow(2).mean()
        scaler.scale(loss).backward()
        if step == 5:
            model.weight.grad[0, 0] = float("nan")
            before = copy.deepcopy(model.state_dict())
            state_before = copy.deepcopy(opt.state[model.weight])
        scaler.step(opt)
        scaler.update()
        if step == 5:
            assert torch.equal(model.weight, before["weight"])
            for key, value in state_before.items():
                assert torch.equal(opt.state[model.weight][key], value)
    assert float(opt.state[model.weight]["step"]) == STEPS - 1


def test_capturable_step_in_cuda_graph():
    params = cuda_params()[:1]
    params[0].grad = torch.randn_like(params[0])
    lr = torch.tensor(1e-2, device="cuda")
    opt = FusedAdamW(params, lr=lr, capturable=True)
    opt.step()  # state created eagerly
    eager = clone_params(params)
    eager[0].grad = params[0].grad.clone()
    eager_opt = FusedAdamW(eager, lr=lr.clone(), capturable=True)
    eager_opt.step()
    eager_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    with torch.no_grad():
        eager[0].copy_(params[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(params[0], eager[0], rtol=0, atol=0)


# ---- stacked groups (per-member lr / weight decay) on CUDA ----

def test_stacked_cuda_equals_separate_runs_bitwise_and_cpu_closely():
    from test_stacked_adamw import LRS, K, assert_state_equal, run_separate, run_stacked, stacked_params

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    stacked = stacked_params(dtypes, device="cuda")
    opt = run_stacked(stacked, amsgrad=True, master_weights=True)
    for k, (singles, single_opt) in enumerate(run_separate(stacked_params(dtypes, device="cuda"), FusedAdamW,
                                                           amsgrad=True, master_weights=True)):
        assert_state_equal(opt, stacked, k, single_opt, singles)
    on_cpu = stacked_params(dtypes)
    run_stacked(on_cpu, amsgrad=True, master_weights=True)
    for p, q in zip(stacked, on_cpu):
        torch.testing.assert_close(p.cpu().float(), q.float(), rtol=1e-5, atol=1e-5)
    assert len(LRS) == K


def test_stacked_cuda_frozen_member_with_nan_grads_is_untouched():
    from test_stacked_adamw import LRS, grads, run_stacked, stacked_params

    stacked = stacked_params(device="cuda")
    lr = torch.tensor(LRS, device="cuda")
    opt = run_stacked(stacked, steps=2, lr=lr, amsgrad=True)
    before = [(p.detach().clone(), {key: v.clone() for key, v in opt.state[p].items() if key != "step"})
              for p in stacked]
    lr[1] = 0.0
    for step in range(2, 5):
        for p, grad in zip(stacked, grads(stacked, step, nan_member=1)):
            p.grad = grad
        opt.step()
    for p, (old, state) in zip(stacked, before):
        assert torch.equal(p.detach()[1], old[1])
        for key, value in state.items():
            assert torch.equal(opt.state[p][key][1], value[1]), key
        if p.numel():
            assert torch.isfinite(p.detach()).all()


def test_stacked_step_with_device_lr_never_syncs():
    from test_stacked_adamw import LRS, stacked_params

    stacked = stacked_params(device="cuda")
    lr = torch.tensor(LRS, device="cuda")
    opt = FusedAdamW(stacked, lr=lr, weight_decay=torch.full((len(LRS),), 0.1, device="cuda"))
    for p in stacked:
        p.grad = torch.randn_like(p)
    opt.step()  # state created
    peaks = lr.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mult in (0.5, 0.25):
            opt.param_groups[0]["lr"].copy_(peaks * mult)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
