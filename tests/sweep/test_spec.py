import json
import math

import pytest

from steplaw.errors import UserError
from steplaw.sweep.spec import ModelSpec, SweepSpec, batch_grid, lr_grid, step_law
from steplaw.train.config import RunConfig
from steplaw.trainers.steplaw import SteplawTrainer

SHAPE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 96}


@pytest.mark.parametrize("center, span, points, expected", [
    (0.01, 4.0, 5, [0.0025, 0.005, 0.01, 0.02, 0.04]),
    (0.01, 4.0, 1, [0.01]),
    (1e-3, 2.0, 3, [5e-4, 1e-3, 2e-3]),
])
def test_lr_grid_is_log_spaced_around_centre(center, span, points, expected):
    assert lr_grid(center, span, points) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("center, points, seq_len, tokens, min_steps, expected", [
    (1000, 5, 128, 10**8, 16, [256, 512, 1024, 2048, 4096]),
    (100, 3, 128, 10**8, 16, [128, 256, 512]),  # shifted up: no batch below one sequence
    (10**6, 3, 128, 2**20, 16, [16384, 32768, 65536]),  # shifted down: at least 16 steps
    (512, 5, 256, 4096, 4, [256, 512, 1024]),  # budget too small for the window: what fits
])
def test_batch_grid_powers_of_two_within_bounds(center, points, seq_len, tokens, min_steps, expected):
    assert batch_grid(center, points, seq_len, tokens, min_steps) == expected


def test_batch_grid_refuses_impossible_budget():
    with pytest.raises(UserError, match="too small"):
        batch_grid(1000, 3, 128, 1000, 16)


def test_step_law_values():
    lr, bs = step_law(1e9, 1e11)
    assert lr == pytest.approx(1.79 * 1e9**-0.713 * 1e11**0.307)
    assert bs == pytest.approx(0.58 * 1e11**0.571)


def test_expand_counts_grid_and_ids_are_deterministic():
    spec = SweepSpec(models=[ModelSpec(shape=SHAPE), ModelSpec(shape={**SHAPE, "d_model": 64, "n_heads": 4})],
                     tokens=[2**17, 2**18], lr_points=4, batch_points=3, fixed={"seq_len": 64})
    runs = spec.bind(SteplawTrainer()).expand()
    assert len(runs) == 2 * 2 * 4 * 3
    ids = [r.run_id() for r in runs]
    assert len(set(ids)) == len(ids)
    again = SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).bind(SteplawTrainer()).expand()
    assert [r.run_id() for r in again] == ids
    for cell in spec.cells():
        lr_law, bs_law = step_law(cell.n_params, cell.tokens)
        # the grid is centred on the Step Law: its geometric mean is the prediction
        assert math.exp(sum(map(math.log, cell.lrs)) / len(cell.lrs)) == pytest.approx(lr_law, rel=0.01)
        assert min(cell.batch_sizes) <= bs_law * 2 and max(cell.batch_sizes) >= bs_law / 2


def test_changed_setting_is_a_new_run():
    base = dict(models=[ModelSpec(shape=SHAPE)], tokens=[2**16], lr_points=2, batch_points=2, fixed={"seq_len": 64})
    ids = {r.run_id() for r in SweepSpec(**base).bind(SteplawTrainer()).expand()}
    changed = {r.run_id() for r in SweepSpec(**{**base, "fixed": {"seq_len": 64, "seed": 1}}).bind(SteplawTrainer()).expand()}
    assert not ids & changed


def test_params_entries_use_the_recipe():
    spec = SweepSpec(models=[ModelSpec(params=5e4), ModelSpec(params=5e4, moe={"n_experts": 4, "top_k": 1})],
                     tokens=[2**17], lr_points=2, batch_points=2, fixed={"seq_len": 64})
    dense, moe = spec.cells()
    assert dense.model.moe is None and moe.model.moe.n_experts == 4
    assert 4e4 < dense.n_params < 6e4
    assert all(isinstance(r, RunConfig) for r in spec.bind(SteplawTrainer()).expand())


def test_from_toml(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text("""
tokens = [131072, 262144]
lr_points = 3
lr_span = 2.0
batch_sizes = [256, 512]
[fixed]
seq_len = 64
schedule = "wsd"
[[models]]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 96
[[models]]
params = 50000
moe = {n_experts = 4, top_k = 2}
""")
    spec = SweepSpec.from_file(path)
    runs = spec.bind(SteplawTrainer()).expand()
    assert len(runs) == 2 * 2 * 3 * 2
    assert {r.schedule for r in runs} == {"wsd"}
    assert {r.batch_tokens for r in runs} == {256, 512}


@pytest.mark.parametrize("data, match", [
    ({"models": [], "tokens": [1000]}, "no models"),
    ({"models": [{"params": 1e5}], "tokens": []}, "no token budgets"),
    ({"models": [{"params": -1}], "tokens": [1e5]}, "params"),
    ({"models": [{"params": 1e5}], "tokens": [1e5], "fixed": {"sequence_length": 64}}, "not a RunConfig field"),
    ({"models": [{"params": 1e5}], "tokens": [1e5], "lr_grid": 3}, "unknown"),
    ({"models": [{"params": 1e5}], "tokens": [1e5], "lrs": [0.0]}, "learning rate"),
    ({"models": [{"d_model": 32, "layers": 2}], "tokens": [1e5]}, "not a ModelConfig field"),
])
def test_bad_specs_are_user_errors(data, match):
    with pytest.raises(UserError, match=match):
        SweepSpec.from_dict(data).bind(SteplawTrainer())


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SweepSpec.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("tokens = [1, \n")
    with pytest.raises(UserError, match="not valid TOML"):
        SweepSpec.from_file(bad)


def test_from_yaml(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "spec.yaml"
    path.write_text("models:\n  - {d_model: 32, n_layers: 2, n_heads: 2, d_ff: 96}\ntokens: [65536]\n"
                    "lr_points: 3\nbatch_points: 2\nfixed: {seq_len: 64, seed: 3}\n")
    runs = SweepSpec.from_file(path).bind(SteplawTrainer()).expand()
    assert len(runs) == 6 and {r.seed for r in runs} == {3}


SPEC_TEXTS = {
    # PyYAML reads 1e6 and 6.5e4 (no dot, or no sign after the e) as text
    "yaml": "models: [1e6, {params: 2M}]\ntokens: [6.5e4, 128k]\nlrs: [1e-3]\nbatch_sizes: [2K]\n",
    "toml": 'models = ["1M", {params = "2M"}]\ntokens = ["6.5e4", "128k"]\nlrs = [1e-3]\nbatch_sizes = ["2K"]\n',
    "json": '{"models": ["1M", {"params": "2M"}], "tokens": ["6.5e4", "128k"], "lrs": ["1e-3"], "batch_sizes": ["2K"]}',
}


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("suffix", sorted(SPEC_TEXTS))
def test_spec_files_take_counts_as_the_cli_does(suffix, bom, tmp_path):
    if suffix == "yaml":
        pytest.importorskip("yaml")
    path = tmp_path / f"spec.{suffix}"
    path.write_bytes(("\ufeff" if bom else "").encode() + SPEC_TEXTS[suffix].encode())  # a BOM, as Windows editors write
    spec = SweepSpec.from_file(path)
    assert [m.params for m in spec.models] == [1e6, 2e6]
    assert spec.tokens == [65000, 128000] and spec.lrs == [1e-3] and spec.batch_sizes == [2000]


def test_default_seq_len_is_steplaws():
    # the sweep knows no RunConfig: its default sequence length must be the trainer's
    from steplaw.sweep.spec import DEFAULT_SEQ_LEN

    assert DEFAULT_SEQ_LEN == RunConfig.__dataclass_fields__["seq_len"].default


def test_unbound_steplaw_spec_says_how_to_bind():
    spec = SweepSpec(models=[ModelSpec(shape=SHAPE)], tokens=[2**17], lr_points=1, batch_points=1)
    with pytest.raises(RuntimeError, match="bind"):
        spec.expand()
