import math
import re

import pytest

from steplaw.errors import UserError
from steplaw.models import MoEConfig, model_for_params, param_counts
from steplaw.models.recipe import head_size_for


@pytest.mark.parametrize("n_params", [1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 1e9])
def test_dense_recipe_hits_target(n_params):
    config = model_for_params(n_params)
    n = param_counts(config).non_embedding
    assert abs(n / n_params - 1) <= 0.1
    assert config.head_dim == head_size_for(config.d_model)
    assert config.d_ff % 32 == 0 and config.d_ff >= 8 * config.d_model / 3


@pytest.mark.parametrize("n_params", [3e6, 1e7, 1e8, 1e9])
def test_dense_recipe_keeps_aspect_ratio(n_params):
    config = model_for_params(n_params)
    assert 32 <= config.d_model / config.n_layers <= 128


def test_recipe_grows_with_target():
    sizes = [param_counts(model_for_params(n)).non_embedding for n in (1e6, 1e7, 1e8)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("target", ["total", "active"])
@pytest.mark.parametrize("n_params", [1e6, 1e7])
def test_moe_recipe_targets(target, n_params):
    config = model_for_params(n_params, moe=MoEConfig(n_experts=8, top_k=2), target=target)
    counts = param_counts(config)
    hit = counts.non_embedding if target == "total" else counts.active
    assert abs(hit / n_params - 1) <= 0.1
    assert counts.active < counts.non_embedding
    assert config.moe.n_experts == 8 and config.moe.top_k == 2


def test_moe_active_matches_dense_of_same_width():
    dense = model_for_params(1e7)
    moe = model_for_params(1e7, moe=MoEConfig(n_experts=8, top_k=2), target="active")
    ratio = param_counts(moe).active / param_counts(dense).non_embedding
    assert math.isclose(ratio, 1.0, rel_tol=0.15)


@pytest.mark.parametrize("bad", [0, -5, 10, float("nan"), float("inf")])
def test_recipe_refuses_bad_targets(bad):
    with pytest.raises(UserError, match="n_params"):
        model_for_params(bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_params=float("nan")), "n_params=nan"),
    (dict(n_params=1e6, vocab_size=0), "vocab_size=0"),
    (dict(n_params=1e6, target="activated"), "target='activated'"),
    (dict(n_params=1e6, max_seq_len=0), "max_seq_len=0"),
    # no shape fits: the budget, the experts, what would fit (was "min() arg is an empty sequence")
    (dict(n_params=2e4, moe=MoEConfig(n_experts=1000, top_k=2)),
     "n_params=20000 is too small for 1000 experts per MoE layer: the smallest shape (1 layer, d_model 16) has "
     "1,553,072 non-embedding parameters; expected n_params >= 1,553,072, or at most 13 experts"),
    (dict(n_params=1000, moe=MoEConfig(n_experts=1000, top_k=2)), "or a dense model"),
    # shapes exist but the smallest is 5x the budget: it used to be returned as "20K"
    (dict(n_params=2e4, moe=MoEConfig(n_experts=64, top_k=2)),
     "the smallest shape (1 layer, d_model 16) has 100,400 non-embedding parameters; expected n_params >= 100,400, or at most 13 experts"),
    (dict(n_params=2e4, moe=MoEConfig(n_experts=100_000, top_k=2), target="active"), "active parameters"),
])
def test_recipe_refuses_bad_inputs_in_one_sentence(kwargs, match):
    with pytest.raises(UserError, match=re.escape(match)) as info:
        model_for_params(**kwargs)
    assert "\n" not in str(info.value)


def test_the_expert_count_the_refusal_names_fits():
    with pytest.raises(UserError, match="at most 13 experts"):
        model_for_params(2e4, moe=MoEConfig(n_experts=1000, top_k=2))
    config = model_for_params(2e4, moe=MoEConfig(n_experts=13, top_k=2))
    assert param_counts(config).non_embedding <= 2e4 * 1.1
