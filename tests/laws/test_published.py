"""Published laws against values worked out by hand from the papers' formulas."""
import math

import pytest

from steplaw.errors import UserError
from steplaw.laws.published import (
    LAWS,
    disagreements,
    kaplan_critical_batch,
    kaplan_loss,
    kaplan_lr,
    porian_law,
    predict_all,
    resolve_law_names,
    step_law,
)


# Step Law (arXiv:2503.04715): lr = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571.
# N=1e9, D=1e11: log10 lr = log10 1.79 - 0.713*9 + 0.307*11 = 0.25285 - 6.417 + 3.377 = -2.78715
#   -> lr = 1.6325e-3;  log10 B = log10 0.58 + 0.571*11 = -0.23657 + 6.281 = 6.04443 -> B = 1.1077e6.
# N=1e8, D=1e10: log10 lr = 0.25285 - 5.704 + 3.07 = -2.38115 -> 4.1577e-3;
#   log10 B = -0.23657 + 5.71 = 5.47343 -> 2.9746e5.
@pytest.mark.parametrize("n, d, lr, bs", [(1e9, 1e11, 1.6325e-3, 1.1077e6), (1e8, 1e10, 4.1577e-3, 2.9746e5)])
def test_step_law_matches_hand_values(n, d, lr, bs):
    got_lr, got_bs = step_law(n, d)
    assert got_lr == pytest.approx(lr, rel=2e-4)
    assert got_bs == pytest.approx(bs, rel=2e-4)


def test_deepseek_matches_hand_value():
    # DeepSeek LLM (arXiv:2401.02954): C = 6*1e9*1e11 = 6e20, log10 C = 20.77815;
    # log10 lr = log10 0.3118 - 0.125*20.77815 = -0.50613 - 2.59727 = -3.10340 -> 7.8815e-4
    # log10 B = log10 0.2920 + 0.3271*20.77815 = -0.53462 + 6.79653 = 6.26191 -> 1.8277e6
    (pred,) = predict_all(1e9, 1e11, laws="deepseek")
    assert pred.derived["compute"] == pytest.approx(6e20)
    assert pred.lr == pytest.approx(7.8815e-4, rel=3e-4)
    assert pred.batch_tokens == pytest.approx(1.8277e6, rel=3e-4)


def test_deepseek_uses_given_compute():
    (pred,) = predict_all(1e9, 1e11, compute=1e20, laws="deepseek")
    # log10 lr = -0.50613 - 2.5 = -3.00613 -> 9.860e-4
    assert pred.lr == pytest.approx(9.860e-4, rel=3e-4)
    assert "compute" not in pred.derived


def test_kaplan_matches_hand_values():
    # Kaplan Eq. 1.5 at N=1e9, D=1e11: (8.8e4)^0.8 = e^(0.8*11.38509) = e^9.10807 = 9016.2;
    # + 5.4e13/1e11 = 540 -> 9556.2; ^0.095 = e^(0.095*9.16498) = e^0.870673 = 2.38840
    assert kaplan_loss(1e9, 1e11) == pytest.approx(2.3884, rel=2e-4)
    # B_crit = 2.1e8 / 2.3884^(1/0.21) = 2.1e8 / e^(4.761905*0.870673) = 2.1e8 / e^4.14606 = 2.1e8/63.20
    assert kaplan_critical_batch(2.3884) == pytest.approx(3.3228e6, rel=1e-3)
    # L = 3: 3^(1/0.21) = e^(4.761905*1.098612) = e^5.231487 = 187.07 -> 1.12257e6
    assert kaplan_critical_batch(3.0) == pytest.approx(1.12257e6, rel=2e-4)


def test_kaplan_prefers_given_loss():
    (pred,) = predict_all(1e9, 1e11, loss=3.0, laws="kaplan")
    assert pred.lr == pytest.approx(kaplan_lr(1e9))  # the LR law depends on N only
    assert pred.batch_tokens == pytest.approx(1.12257e6, rel=2e-4)


@pytest.mark.parametrize("key", list(LAWS))
def test_registry_entries_are_complete(key):
    info = LAWS[key].info()
    for field in ("formula", "input_units", "output_units", "citation", "fitted_range"):
        assert info[field], field
    assert "arXiv:" in info["citation"]
    for low, high in info["fitted_range"].values():
        assert 0 < low < high


@pytest.mark.parametrize("n, d", [(0, 1e10), (-1e9, 1e10), (1e9, 0), (1e9, -5), (math.nan, 1e10), (1e9, math.inf), ("x", 1e10)])
def test_bad_inputs_are_refused(n, d):
    with pytest.raises(UserError):
        predict_all(n, d)


def test_range_warning_only_outside_fitted_range():
    inside = predict_all(3e8, 1e10, laws="step_law")[0]
    outside = predict_all(7e10, 1e13, laws="step_law")[0]
    assert inside.warnings == []
    assert any("outside the range" in w and "N=" in w for w in outside.warnings)
    assert any("D=" in w for w in outside.warnings)


def test_moe_reports_total_and_active():
    preds = predict_all(8e9, 1e11, n_active=1e9, laws="all")
    step = [p for p in preds if p.law == "step_law"]
    assert [p.n_used for p in step] == ["N total (non-embedding)", "N activated (non-embedding)"]
    assert step[1].lr == pytest.approx(step_law(1e9, 1e11)[0])
    deepseek = next(p for p in preds if p.law == "deepseek")
    assert deepseek.derived["compute"] == pytest.approx(6 * 1e9 * 1e11)  # FLOPs follow activated params


def test_moe_active_above_total_is_refused():
    with pytest.raises(UserError, match="exceeds"):
        predict_all(1e9, 1e11, n_active=2e9)


def test_unknown_law_is_refused():
    with pytest.raises(UserError, match="unknown law"):
        resolve_law_names("step_law,chinchilla")


def test_disagreement_lines():
    preds = predict_all(1e9, 1e11)
    lines = disagreements(preds, factor=2.0)
    # Porian lr 2.129e-3 vs Kaplan 3.481e-4 (6.12x); batch Step Law 1.11e6 vs Kaplan 3.32e6 (3.0x).
    assert len(lines) == 2
    assert "learning rate by 6.1x" in lines[0] and "batch size by 3.0x" in lines[1]
    assert len(disagreements(preds, factor=4.0)) == 1
    assert disagreements(preds, factor=7.0) == []


def test_kaplan_lr_matches_hand_values():
    # Eq. D.1: 0.003239 - 0.0001395 * ln(1e9) = 0.003239 - 0.0001395 * 20.7233 = 3.4810e-4
    assert kaplan_lr(1e9) == pytest.approx(3.4810e-4, rel=1e-3)
    # ln(1e6) = 13.8155 -> 0.003239 - 0.0019273 = 1.3117e-3
    assert kaplan_lr(1e6) == pytest.approx(1.3117e-3, rel=1e-3)
    # Above ~1.2e10 the linear-in-log fit is not positive: no LR rather than a negative one.
    assert kaplan_lr(1e11) is None
    (pred,) = predict_all(1e11, 1e12, laws="kaplan")
    assert pred.lr is None and any("not positive" in w for w in pred.warnings)


@pytest.mark.parametrize(
    "n, lr, bs",
    [
        # log10 lr = log10 3.7 - 0.36*9 = 0.568202 - 3.24 = -2.671798 -> 2.1291e-3
        # log10 B = log10 0.7576 + 0.703*9 = -0.120560 + 6.327 = 6.206440 -> 1.60857e6
        (1e9, 2.1291e-3, 1.60857e6),
        # log10 lr = 0.568202 - 2.88 = -2.311798 -> 4.8775e-3; log10 B = -0.120560 + 5.624 -> 3.18742e5
        (1e8, 4.8775e-3, 3.18742e5),
    ],
)
def test_porian_matches_hand_values(n, lr, bs):
    got_lr, got_bs = porian_law(n)
    assert got_lr == pytest.approx(lr, rel=2e-4)
    assert got_bs == pytest.approx(bs, rel=2e-4)
    # The paper's own unit: 0.00037 N^0.703 sequences of 2048 tokens (= 0.75776 N^0.703 tokens).
    assert got_bs / 2048 == pytest.approx(0.00037 * n**0.703, rel=1e-3)


def test_porian_uses_active_params_for_moe_and_warns_outside_its_models():
    (dense,) = predict_all(2e8, 1e10, laws="porian")
    assert dense.warnings == []
    (moe,) = predict_all(1e10, 1e11, n_active=2e8, laws="porian")
    assert moe.lr == pytest.approx(dense.lr) and "active" in moe.n_used
    (big,) = predict_all(7e9, 1e11, laws="porian")
    assert any("outside the range" in w for w in big.warnings)
