import pytest
import torch

from steplaw.models import ModelConfig, Transformer
from steplaw.models.transformer import apply_rotary, rotary_tables

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


@pytest.mark.parametrize("tied", [False, True])
def test_tied_embeddings(tied):
    model = Transformer(ModelConfig(d_model=64, n_layers=1, n_heads=2, d_ff=192, tie_embeddings=tied))
    assert (model.lm_head is None) == tied


def test_too_long_sequence_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(TINY)(torch.zeros(1, 65, dtype=torch.long))


def test_dense_aux_loss_is_zero():
    assert Transformer(TINY).aux_loss() == 0.0
