"""Every law scored on a sweep where the Step Law is the truth, against hand computations."""
import math

import pytest

from steplaw.laws.fit import fit_hparams
from steplaw.laws.scores import FIT_NAME
from steplaw.laws.table import read_runs

K_LR, K_BS, BASE = 0.02, 0.01, 3.0


def step_law_truth_rows():
    """3 x 3 cells; LR grid lr* 2^(i/2), i = -3..3, batch grid B* 2^j, j = -2..2, around the
    Step Law optimum, loss = 3 + 0.02 ln(lr/lr*)^2 + 0.01 ln(B/B*)^2 exactly."""
    rows = []
    for n in (1e8, 2e8, 4e8):
        for d in (2e9, 8e9, 3.2e10):
            lr_star = 1.79 * n**-0.713 * d**0.307
            bs_star = 0.58 * d**0.571
            for i in range(-3, 4):
                for j in range(-2, 3):
                    loss = BASE + K_LR * (i / 2 * math.log(2)) ** 2 + K_BS * (j * math.log(2)) ** 2
                    rows.append({"N": n, "D": d, "lr": lr_star * 2 ** (i / 2), "batch_tokens": bs_star * 2.0**j,
                                 "loss": loss})
    return rows


@pytest.fixture(scope="module")
def fit():
    return fit_hparams(read_runs(step_law_truth_rows()), n_boot=0)


def test_step_law_ranks_first_with_zero_gap(fit):
    first = fit.law_scores[0]
    assert first["law"] == "step_law" and first["rank"] == 1
    assert first["gap_mean"] == pytest.approx(0.0, abs=1e-12) and first["gap_max"] == pytest.approx(0.0, abs=1e-12)
    assert first["lr_factor"] == pytest.approx(1.0, abs=1e-9) and first["bs_factor"] == pytest.approx(1.0, abs=1e-9)
    names = [s["law"] for s in fit.law_scores]
    assert set(names) == {"step_law", "deepseek", "kaplan", "porian", FIT_NAME}
    assert all(set(s) >= {"law", "lr_factor", "bs_factor", "gap_mean", "gap_max"} for s in fit.law_scores)
    gaps = [s["gap_mean"] for s in fit.law_scores if s["gap_mean"] is not None]
    assert gaps == sorted(gaps)


def test_deepseek_gaps_match_a_hand_computation(fit):
    deepseek = next(s for s in fit.law_scores if s["law"] == "deepseek")
    assert deepseek["rank"] > 1
    scored = {(c["N"], c["D"]): c for c in fit.law_cells["deepseek"]}
    # Cell N = 1e8, D = 2e9: C = 6ND = 1.2e18, DeepSeek lr = 0.3118 C^-0.125 = 1.71387e-3 and
    # B = 0.2920 C^0.3271 = 239,377 tokens; the Step Law optimum is lr* = 2.53670e-3,
    # B* = 118,663. In grid steps: 2 log2(lr/lr*) = -1.131 -> nearest i = -1, log2(B/B*) =
    # 1.012 -> nearest j = 1, so the nearest run's loss is 3 + 0.02 (ln 2 / 2)^2 + 0.01 (ln 2)^2.
    cell = scored[(1e8, 2e9)]
    assert cell["lr_factor"] == pytest.approx(2.53670076e-3 / 1.71387228e-3, rel=1e-6)  # 1.4801
    assert cell["bs_factor"] == pytest.approx(239377.340 / 118663.218, rel=1e-6)  # 2.0173
    assert cell["gap"] == pytest.approx((0.02 * (math.log(2) / 2) ** 2 + 0.01 * math.log(2) ** 2) / 3, rel=1e-9)
    # The bowl is exact here (the loss is quadratic): at i = -1.131, j = 1.012 it is
    assert cell["bowl_gap"] == pytest.approx(
        (0.02 * (1.1313874830 * math.log(2) / 2) ** 2 + 0.01 * (1.0124137805 * math.log(2)) ** 2) / 3, rel=1e-6)
    # Cell N = 4e8, D = 3.2e10: i = -2.235 -> -2, j = 0.691 -> 1: gap = 0.03 (ln 2)^2 / 3.
    assert scored[(4e8, 3.2e10)]["gap"] == pytest.approx(0.03 * math.log(2) ** 2 / 3, rel=1e-9)


def test_fitted_law_is_scored_leave_one_cell_out(fit):
    fitted = next(s for s in fit.law_scores if s["law"] == FIT_NAME)
    assert "fit" in fitted["law"] and fitted["cells_scored"] == 9
    assert fitted["gap_max"] == pytest.approx(0.0, abs=1e-9)  # exact data: every fold recovers the truth
    assert fit.to_dict()["law_scores"] == fit.law_scores and "nearest" in fit.scoring

