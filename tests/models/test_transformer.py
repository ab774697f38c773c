import pytest
import torch

from steplaw.models import ModelConfig, Transformer
from steplaw.models.layers import apply_rotary, apply_rotary_rolled, rotary_pair_tables, rotary_tables

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192, max_seq_len=64)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = Transformer(TINY)
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    loss = model(idx, idx)
    # At initialisation the prediction is nearly uniform over 256 tokens.
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_causal():
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    idx = torch.randint(0, 256, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_rotary_is_relative():
    # <rot(q, m), rot(k, n)> depends only on m - n.
    cos, sin = rotary_tables(16, 32, 10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        qm = apply_rotary(q.view(1, 1, 1, 16), cos[m:m + 1], sin[m:m + 1]).flatten()
        kn = apply_rotary(k.view(1, 1, 1, 16), cos[n:n + 1], sin[n:n + 1]).flatten()
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rotary_is_apply_rotary_bit_for_bit(dtype):
    """The stacked model rotates q and k together in qkv's layout [N, T, 2, H, h]; values
    and gradients must equal apply_rotary's on the permuted [N, H, T, h] views exactly."""
    torch.manual_seed(0)
    cos, sin = rotary_tables(16, 8, 10000.0)
    cos2, sin2 = rotary_pair_tables(cos, sin)
    qkv = torch.randn(4, 8, 3, 2, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 4, 2, 8, 16, dtype=dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.stack([apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)])
    (ref * grad).sum().backward()
    ref_grad, qkv.grad = qkv.grad, None
    rolled = apply_rotary_rolled(qkv[:, :, :2], cos2.view(8, 1, 1, 16), sin2.view(8, 1, 1, 16)).permute(2, 0, 3, 1, 4)
    (rolled * grad).sum().backward()
    assert torch.equal(rolled, ref)
    assert torch.equal(qkv.grad, ref_grad)


@pytest.mark.parametrize("tied", [False, True])
def test_tied_embeddings(tied):
    model = Transformer(ModelConfig(d_model=64, n_layers=1, n_heads=2, d_ff=192, tie_embeddings=tied))
    assert (model.lm_head is None) == tied


def test_too_long_sequence_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TINY)(torch.zeros(1, 65, dtype=torch.long))


def test_dense_aux_loss_is_zero():
    assert Transformer(TINY).aux_loss() == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_stacked_members_are_the_single_model(tied):
    """Each member of a StackedTransformer computes its own Transformer, whatever the
    other members' weights: the same losses, logits and gradients to the last bit (both
    run steplaw.models.layers, the single model as one member)."""
    from steplaw.models.stacked import StackedTransformer

    config = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32, tie_embeddings=tied)
    torch.manual_seed(0)
    stacked = StackedTransformer(config, 3)
    with torch.no_grad():
        for p in stacked.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # members differ
    idx, targets = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    losses = stacked(idx, targets)
    losses.sum().backward()
    logits = stacked(idx)
    assert losses.shape == (3,) and logits.shape == (3, 2, 32, 256)
    for k in range(3):
        single = Transformer(config)
        single.load_state_dict({name: v.detach().clone() for name, v in stacked.member_state_dict(k).items()})
        loss = single(idx, targets)
        loss.backward()
        assert torch.equal(losses[k], loss)
        assert torch.equal(logits[k], single(idx))
        member = stacked.member_state_dict(k)
        for name, p in single.named_parameters():
            stacked_param = member[name]._base  # member_state_dict gives views param[k]
            assert torch.equal(stacked_param.grad[k], p.grad), name


def test_stacked_member_nan_stays_in_its_member():
    from steplaw.models.stacked import StackedTransformer

    torch.manual_seed(0)
    stacked = StackedTransformer(TINY, 3)
    idx = torch.randint(0, 256, (2, 16))
    before = stacked(idx, idx).detach()
    with torch.no_grad():
        stacked.layers[0].qkv[1].fill_(float("nan"))
    losses = stacked(idx, idx)
    losses.sum().backward()
    assert torch.isnan(losses[1])
    assert torch.equal(losses[[0, 2]], before[[0, 2]])
    for p in stacked.parameters():
        assert torch.isfinite(p.grad[0]).all() and torch.isfinite(p.grad[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_and_mlp_modules_take_any_leading_shape(dtype):
    """RMSNorm and SwiGLU take [..., d] as well as the model's own [1, M, d] rows: the
    values of F.rms_norm and down(silu(gate) * up), gradients included."""
    import torch.nn.functional as F

    from steplaw.models.transformer import RMSNorm, SwiGLU

    torch.manual_seed(0)
    norm, mlp = RMSNorm(8, 1e-5).to(dtype), SwiGLU(8, 12).to(dtype)
    with torch.no_grad():
        norm.weight.add_(torch.randn(8, dtype=dtype))
    x = torch.randn(2, 3, 5, 8, dtype=dtype, requires_grad=True)
    gate, up = F.linear(x, mlp.gate_up.weight).chunk(2, dim=-1)
    expected = (F.rms_norm(x, (8,), norm.weight, 1e-5), F.linear(F.silu(gate) * up, mlp.down.weight))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for module, want in zip((norm, mlp), expected):
        got = module(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, **tol)
        grads = torch.autograd.grad(got.sum(), [x, *module.parameters()])
        wants = torch.autograd.grad(want.sum(), [x, *module.parameters()])
        for g, w in zip(grads, wants):
            torch.testing.assert_close(g, w, **tol)


def test_a_sequence_longer_than_max_seq_len_is_refused_by_both_models():
    from steplaw.models.stacked import StackedTransformer

    config = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=32, max_seq_len=8)
    idx = torch.zeros(2, 9, dtype=torch.long)
    for model in (Transformer(config), StackedTransformer(config, 2)):
        with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
            model(idx)
