"""The adaptive planner on a known landscape (tests/sweep/planner_fakes.py), in process."""
import json
import math
import random

import pytest
from planner_fakes import landscape_loss, landscape_run, optimum

from steplaw.errors import UserError
from steplaw.laws.fit import fit_hparams
from steplaw.laws.table import read_runs
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.executors import InlineExecutor
from steplaw.sweep.planner import AdaptivePlanner, AdaptiveSettings, RunView, SearchCell, first_wave, plan_cell, spec_cells
from steplaw.sweep.spec import ModelSpec, SweepSpec
from steplaw.sweep.store import ResultStore, export_rows
from steplaw.trainers.steplaw import SteplawTrainer

SHAPES = [{"d_model": d, "n_layers": 1, "n_heads": 2, "d_ff": 2 * d, "max_seq_len": 64} for d in (16, 32, 64)]


def spec(tokens=(65536, 262144, 1048576), lr_scale=1.0, bs_scale=1.0, shapes=SHAPES, min_steps=16):
    # the centre scales move the prior: the Step Law is far from this landscape's optimum
    return SweepSpec(models=[ModelSpec(shape=s) for s in shapes], tokens=list(tokens), lr_center_scale=lr_scale,
                     batch_center_scale=bs_scale, min_steps=min_steps, fixed={"seq_len": 64, "device": "cpu"}).bind(SteplawTrainer())


def sweep(tmp_path, the_spec, settings=None, name="s"):
    planner = AdaptivePlanner(spec_cells(the_spec), settings)
    summary = run_sweep([], tmp_path / name, lambda: InlineExecutor(landscape_run, capacity=4, run_dirs=False),
                        progress=False,
                        trainer=SteplawTrainer(), planner=planner)
    return summary, planner


def views_of(out, planner_max_attempts=2):
    with ResultStore(out, readonly=True) as store:
        return {row["run_id"]: RunView(row["run_id"], json.loads(row["config"]), row["status"],
                                       row["loss"]) for row in store.rows()}


def test_every_cell_ends_bracketed_with_an_interior_optimum(tmp_path):
    summary, _ = sweep(tmp_path, spec(lr_scale=0.05, bs_scale=0.3))
    assert {c["state"] for c in summary.cells} == {"bracketed"}
    assert summary.planner == "adaptive" and "planner adaptive (9 bracketed cells)" in summary.line()
    fit = fit_hparams(read_runs(export_rows(tmp_path / "s")), n_boot=0)
    for cell in fit.cells:
        assert cell.lr_edge is None and cell.bs_edge is None
        lr_star, bs_star = optimum(_d_model(cell.N), cell.D)
        # the near-optimal set's centre is within a lattice step or so of the true optimum
        assert abs(math.log(cell.opt_bs / bs_star)) < 0.8 and abs(math.log(cell.best_lr / lr_star)) < 1.0
    with ResultStore(tmp_path / "s", readonly=True) as store:
        assert store.meta("planner") == "adaptive"
        assert [c["runs"] for c in store.meta("planner_cells")] == [c["runs"] for c in summary.cells]
    assert sum(c["runs"] for c in summary.cells) == summary.total


def _d_model(n_params):
    from steplaw.models.config import ModelConfig
    from steplaw.sweep.spec import count_params

    for shape in SHAPES:
        if count_params(ModelConfig(**shape, vocab_size=256))["non_embedding"] == n_params:
            return shape["d_model"]
    raise AssertionError(n_params)


def test_extends_past_a_far_prior_and_stops_only_at_hard_limits(tmp_path):
    # prior 100x above the optimal LR (runs there diverge) and at the largest batch: the
    # search walks down; in the smallest cell (D=4096: batches of 64..256 tokens only) the
    # batch sides end at hard limits (an 'edge' cell), never at an extendable edge.
    the_spec = spec(tokens=(4096, 262144, 1048576), lr_scale=6.0, bs_scale=30.0)
    summary, _ = sweep(tmp_path, the_spec)
    seq_len = 64
    for cell in summary.cells:
        assert cell["state"] in ("bracketed", "edge")
        for side, verdict in cell["sides"].items():
            if verdict == "limit":
                # only the batch limits (one sequence; D / min_steps = 256 tokens), where the
                # whole batch range (64..256 tokens) is near-optimal
                assert cell["state"] == "edge" and side.startswith("bs_") and cell["D"] == 4096
    assert any(cell["state"] == "edge" for cell in summary.cells)
    fit = fit_hparams(read_runs(export_rows(tmp_path / "s")), n_boot=0)
    for cell in fit.cells:
        assert cell.lr_edge is None
        assert cell.bs_edge is None or (cell.bs_edge == "low" and cell.best_bs == seq_len)


def test_diverged_runs_bound_the_lr_side():
    # A lattice of 8 LRs x 4 batch sizes; the best run has only diverged runs above it.
    lrs, batch_sizes = [0.001 * 2**k for k in range(8)], [256.0, 512.0, 1024.0, 2048.0]
    cell = SearchCell("k", "cell", 1e6, 1e8, lrs, batch_sizes, (0.004, 512.0), make=lambda i, j: (i, j),
                      locate=lambda config: None)
    results = {(1, 1): ("ok", 2.10), (2, 1): ("ok", 2.00), (3, 1): ("diverged", None), (4, 1): ("diverged", None),
               (2, 0): ("ok", 2.05), (2, 2): ("ok", 2.04)}
    plan = plan_cell(cell, results, cell.prior, AdaptiveSettings(), None)
    assert plan.best == (2, 1) and plan.sides["lr_high"] == "bracketed" and plan.state == "bracketed"
    # without the diverged runs the same side is open: the search extends past it
    del results[(3, 1)], results[(4, 1)]
    plan = plan_cell(cell, results, cell.prior, AdaptiveSettings(), None)
    assert plan.sides["lr_high"] == "open" and (3, 1) in plan.points
    # failed runs carry no information: stepped over, the next LR is tried
    results[(3, 1)] = ("failed", None)
    plan = plan_cell(cell, results, cell.prior, AdaptiveSettings(), None)
    assert (4, 1) in plan.points


def test_budget_out_cell_is_unbracketed_and_said_so(tmp_path):
    summary, _ = sweep(tmp_path, spec(tokens=(65536,), shapes=SHAPES[:1], lr_scale=3.0),
                       AdaptiveSettings(cell_budget=6, first_wave=1))
    (cell,) = summary.cells
    assert cell["state"] == "unbracketed" and cell["runs"] == 6 and summary.total == 6
    assert "1 unbracketed cells" in summary.line() and "6 runs, unbracketed" in summary.line()


def test_total_budget_is_split_evenly_and_validated(tmp_path):
    summary, _ = sweep(tmp_path, spec(), AdaptiveSettings(cell_budget=None, total_budget=45))
    assert all(cell["runs"] <= 5 for cell in summary.cells)
    with pytest.raises(UserError, match="less than one run per cell"):
        AdaptivePlanner(spec_cells(spec()), AdaptiveSettings(total_budget=4))
    with pytest.raises(UserError, match="cell-budget 0"):
        AdaptiveSettings(cell_budget=0)


def test_proposals_depend_only_on_the_finished_runs(tmp_path):
    summary, planner = sweep(tmp_path, spec(lr_scale=0.05))
    views = views_of(tmp_path / "s")
    items = list(views.items())
    rng = random.Random(0)
    for _ in range(5):
        # any subset of the finished runs, in any order, to a fresh planner: same proposals
        subset = dict(rng.sample(items, rng.randrange(1, len(items))))
        shuffled = dict(rng.sample(list(subset.items()), len(subset)))
        first = [c.run_id() for c in planner.propose(subset)]
        fresh = AdaptivePlanner(spec_cells(spec(lr_scale=0.05)), AdaptiveSettings())
        assert [c.run_id() for c in fresh.propose(shuffled)] == first
    assert planner.propose(views) == []  # a finished sweep proposes nothing


def test_a_cell_waits_while_it_has_open_runs_and_later_cells_wait_for_the_first_wave():
    cells = spec_cells(spec(lr_scale=0.05))
    planner = AdaptivePlanner(cells, AdaptiveSettings())
    first = planner.propose({})
    wave = {c.key for c in first_wave(cells, 3)}
    assert len(wave) == 3 and {c.N for c in first_wave(cells, 3)} == {c.N for c in cells}
    assert len({c.D for c in first_wave(cells, 3)}) == 3
    by_cell = {}
    for config in first:
        by_cell.setdefault(config.model.d_model, []).append(config)
    assert len(first) == 15  # 3 cells x (3 LRs at one batch size + 2 batch neighbours)
    # the three LRs of a cell's first batch share a batch size (they can train as a stack)
    lrs_at_prior = [c for c in first[:5] if c.batch_tokens == first[0].batch_tokens]
    assert len(lrs_at_prior) == 3
    open_views = {c.run_id(): RunView(c.run_id(), c.to_dict(), "open") for c in first}
    assert planner.propose(open_views) == []
    # one run of a batch finished: the cell still waits for the rest
    done = dict(open_views)
    loss = landscape_loss(first[0].lr, first[0].batch_tokens, first[0].model.d_model, first[0].tokens)
    done[first[0].run_id()] = RunView(first[0].run_id(), first[0].to_dict(), "ok", loss)
    assert planner.propose(done) == []


def test_grid_planner_is_todays_behaviour(tmp_path):
    runs = spec(lr_scale=0.05).expand()
    summary = run_sweep(runs, tmp_path / "g", lambda: InlineExecutor(landscape_run, capacity=4, run_dirs=False), progress=False,
                        trainer=SteplawTrainer())
    assert summary.planner == "grid" and summary.total == len(runs) and summary.cells == []
    with ResultStore(tmp_path / "g", readonly=True) as store:
        assert store.meta("planner") == "grid"


def _lattice_cell():
    lrs = [0.001 * 2 ** (k / 2) for k in range(12)]  # sqrt(2) apart
    return SearchCell(key="c", label="c", N=1e4, D=1e5, lrs=lrs, batch_sizes=[64.0, 128.0, 256.0], prior=(lrs[4], 128.0),
                      make=lambda i, j: None, locate=lambda config: None)



def test_an_lr_bracket_is_bisected_one_run_per_side():
    # best at lr index 4; runs beyond the gap 4 lattice steps (4x) away on both sides; the
    # batch line is bracketed by its neighbours: the midpoints (2x) come next, not the whole bracket
    results = {(4, 1): ("ok", 2.0), (0, 1): ("ok", 2.3), (8, 1): ("ok", 2.2), (4, 0): ("ok", 2.1), (4, 2): ("ok", 2.1)}
    plan = plan_cell(_lattice_cell(), results, (0.004, 128.0), AdaptiveSettings(lr_resolution=2 ** 0.5), None)
    assert plan.state == "searching" and plan.points == [(2, 1), (6, 1)]
