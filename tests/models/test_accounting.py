import pytest

from steplaw.models import ModelConfig, MoEConfig, Transformer, flops_per_token, param_counts
from steplaw.models.accounting import module_param_counts

DENSE_SHAPES = [
    dict(d_model=64, n_layers=2, n_heads=2, d_ff=192),
    dict(d_model=96, n_layers=3, n_heads=3, d_ff=256, tie_embeddings=True),
    dict(d_model=128, n_layers=1, n_heads=4, d_ff=352, vocab_size=1000),
]


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_counts_match_module(shape):
    config = ModelConfig(**shape)
    model = Transformer(config)
    counts = param_counts(config)
    real = module_param_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.non_embedding == real.non_embedding
    assert counts.embedding == real.embedding
    assert counts.active == counts.non_embedding  # dense: every parameter is used by every token


def test_dense_count_by_hand():
    # d=64, L=2, d_ff=192, V=256 untied: per layer 4*64^2 + 3*64*192 + 2*64, final norm 64.
    counts = param_counts(ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192))
    assert counts.non_embedding == 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64
    assert counts.embedding == 2 * 256 * 64


def test_flops_per_token_terms():
    config = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=192)
    n = param_counts(config).active
    assert flops_per_token(config, 128) == 6 * n + 6 * 64 * 256 + 6 * 2 * 128 * 64
    assert flops_per_token(config, 128, causal=False) == 6 * n + 6 * 64 * 256 + 12 * 2 * 128 * 64


MOE_SHAPES = [
    MoEConfig(n_experts=4, top_k=1, d_expert=32),
    MoEConfig(n_experts=8, top_k=2, d_expert=48, n_shared_experts=1),
    MoEConfig(n_experts=4, top_k=2, d_expert=32, moe_every=2, moe_first=1),
]


@pytest.mark.parametrize("moe", MOE_SHAPES)
def test_moe_counts_match_module(moe):
    pytest.importorskip("steplaw.models.moe")
    config = ModelConfig(d_model=64, n_layers=3, n_heads=2, d_ff=192, moe=moe)
    model = Transformer(config)
    counts = param_counts(config)
    real = module_param_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.non_embedding == real.non_embedding
    # Active, from the module: all of a layer except the (E - k) routed experts a token skips.
    skipped = 0
    for layer in model.moe_layers():
        expert_params = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("experts."))
        skipped += expert_params // moe.n_experts * (moe.n_experts - moe.top_k)
    assert counts.active == real.non_embedding - skipped
    assert counts.active < counts.non_embedding
