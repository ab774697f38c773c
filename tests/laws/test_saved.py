"""Law files: strict JSON written atomically, read back to the same predictions."""
import json
import math

import numpy as np
import pytest

from steplaw.errors import UserError
from steplaw.laws.fit import fit_hparams
from steplaw.laws.saved import SavedHparamLaw, hparam_law_record, read_law, write_json
from steplaw.laws.stats import percentile_interval
from steplaw.laws.synthetic import synthetic_runs
from steplaw.runtable import json_safe


def test_write_json_is_strict(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64(2.5),
                                            "d": (np.int64(3), None)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": 2.5, "d": [3, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_json_safe_and_interval():
    assert json_safe({"x": [math.nan, 1]}) == {"x": [None, 1]}
    assert percentile_interval([1.0, np.nan, 2.0, 3.0]) == pytest.approx((1.05, 2.95))
    assert all(math.isnan(v) for v in percentile_interval([np.nan]))


def test_hparam_law_round_trip(tmp_path):
    table = synthetic_runs(seed=1, n_values=(6e7, 2.4e8, 9.6e8), d_values=(2e9, 8e9, 3.2e10))
    fit = fit_hparams(table, n_boot=30)
    law = read_law(write_json(tmp_path / "law.json", hparam_law_record(fit, "synthetic")))
    assert isinstance(law, SavedHparamLaw)
    lr, bs, warnings = law.predict(2e8, 1e10)
    assert lr == pytest.approx(float(fit.lr_law(2e8, 1e10)), rel=1e-12)
    assert bs == pytest.approx(float(fit.bs_law(2e8, 1e10)), rel=1e-12) and warnings == []
    assert any("extrapolation" in w for w in law.predict(1e11, 1e10)[2])


@pytest.mark.parametrize("content, message", [
    ("{oops", "not a JSON law file"),
    ('{"kind": "other"}', "not a steplaw law file"),
    ('{"kind": "steplaw.hparam_law"}', "damaged law file"),
])
def test_bad_law_files(tmp_path, content, message):
    path = tmp_path / "law.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_law(path)
