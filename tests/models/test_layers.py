"""The layers' hand-written autograd Functions (steplaw.models.layers): forward values as
the torch ops they replace, gradients as autograd's (gradcheck in float64)."""
import pytest
import torch
import torch.nn.functional as F

from steplaw.models import ModelConfig
from steplaw.models.layers import _CrossEntropy, _MemberLinear, _MemberRMSNorm, _SwiGLU, linear, rms_norm
from steplaw.models.stacked import StackedTransformer


def test_member_linear():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    assert torch.equal(_MemberLinear.apply(x, w), torch.bmm(x, w.transpose(1, 2)))
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradcheck(_MemberLinear.apply, (x, w))


def test_one_members_weights_need_no_member_dim():
    """A single model passes its own weights ([d_out, d_in], [d]) as one member's: the
    values and gradients of the same weights with a member dim of 1."""
    torch.manual_seed(0)
    x, w, g = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    assert torch.equal(linear(x, w), linear(x, w.unsqueeze(0)))
    assert torch.equal(rms_norm(x, g, 1e-5), rms_norm(x, g.unsqueeze(0), 1e-5))
    x, w, g = (t.requires_grad_() for t in (x, w, g))
    assert torch.autograd.gradcheck(_MemberLinear.apply, (x, w))
    assert torch.autograd.gradcheck(lambda a, b: _MemberRMSNorm.apply(a, b, 1e-5), (x, g))


def test_member_rms_norm():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 8), torch.randn(3, 8)
    expected = F.rms_norm(x, (8,), None, 1e-5) * w.unsqueeze(1)
    assert torch.equal(_MemberRMSNorm.apply(x, w, 1e-5), expected)
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _MemberRMSNorm.apply(a, b, 1e-5), (x, w))


def test_swiglu():
    """Forward and gradient bit for bit as autograd's chunk, silu, mul (non-contiguous input too)."""
    torch.manual_seed(0)
    gate_up = torch.randn(3, 10, 5, 8).transpose(1, 2)[:, :, 1]  # [3, 5, 8], strided
    grad = torch.randn(3, 5, 4)
    gate_up.requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = _SwiGLU.apply(gate_up)
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out, gate_up, grad)[0], torch.autograd.grad(expected, gate_up, grad)[0])
    gate_up = gate_up.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate_up,))


def test_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 11) * 3, torch.randint(0, 11, (5,))
    index = target.view(1, 5, 1).expand(3, 5, 1)
    expected = F.cross_entropy(logits.reshape(-1, 11), target.repeat(3), reduction="none").view(3, 5)
    assert torch.equal(_CrossEntropy.apply(logits, index), expected)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _CrossEntropy.apply(a, index), (logits,))


def test_autocast_takes_the_plain_ops():
    """Under autocast the Functions step aside (they do not follow its dtype rules)."""
    x, w = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16
        assert rms_norm(x, torch.ones(2, 8), 1e-5).dtype == torch.float32
        config = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=32, max_seq_len=8)
        idx = torch.randint(0, 256, (2, 8))
        loss = StackedTransformer(config, 2)(idx, idx)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


@pytest.mark.parametrize("members", [3, 1])
def test_kept_members_read_their_own_embedding_rows(members):
    """The cached member row offsets follow keep_members."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=16, n_layers=1, n_heads=1, d_ff=32, max_seq_len=8)
    model = StackedTransformer(config, 3)
    with torch.no_grad():
        model.tok_emb.add_(torch.randn_like(model.tok_emb))
    idx = torch.randint(0, 256, (2, 8))
    before = model(idx, idx).detach()
    keep = [2, 0, 1][:members]
    model.keep_members(keep)
    assert torch.equal(model(idx, idx), before[keep])


def test_a_members_loss_counts_its_own_first_sequences():
    """With `sequences`, member k's loss and gradient are those of its first n_k sequences
    alone, to the last bit: rows of a dense model do not see each other, and the member's
    loss is the mean over its own rows (24 of them for 3 sequences: not a power of two)."""
    config = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=48, max_seq_len=8)
    torch.manual_seed(0)
    model = StackedTransformer(config, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the members differ
    x, y = torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8))
    counts = (3, 4, 1)
    losses = model(x, y, counts)
    losses.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for k, n in enumerate(counts):
        model.zero_grad()
        alone = model(x[:n], y[:n])[k]
        alone.backward()
        assert torch.equal(losses[k], alone)
        for g, p in zip(grads, model.parameters()):
            assert torch.equal(g[k], p.grad[k])
    assert torch.equal(model(x, y, (4, 4, 4)), model(x, y))  # equal counts: the plain mean
    with pytest.raises(ValueError, match="one count per member"):
        model(x, y, (1, 2))
