"""The adaptive planner under WSD trunks: columns, proposals as trunks, shared evidence,
and the cost model (on the known landscape of tests/sweep/planner_fakes.py)."""
import math

import pytest
from planner_fakes import landscape_run, optimum

from steplaw.sweep.cost import trunk_tokens
from steplaw.sweep.driver import run_sweep
from steplaw.sweep.executors import InlineExecutor
from steplaw.sweep.planner import AdaptivePlanner, AdaptiveSettings, branching, cell_key, spec_cells
from steplaw.sweep.spec import ModelSpec, SweepSpec
from steplaw.trainers.steplaw import SteplawTrainer

SHAPES = [{"d_model": d, "n_layers": 1, "n_heads": 2, "d_ff": 2 * d, "max_seq_len": 64} for d in (16, 64)]
WSD = {"schedule": "wsd", "warmup_tokens": 2048, "decay_fraction": 0.2, "decay_shape": "sqrt"}
TOKENS = (65536, 131072, 262144, 524288)


def spec(fixed=WSD, tokens=TOKENS):
    return SweepSpec(models=[ModelSpec(shape=s) for s in SHAPES], tokens=list(tokens), lr_center_scale=0.05,
                     batch_center_scale=0.3, fixed={"seq_len": 64, "device": "cpu", **fixed}).bind(SteplawTrainer())


def test_columns_only_where_runs_branch():
    cells = spec_cells(spec())
    assert branching(spec()) == 0.2 and len({c.column for c in cells}) == len(SHAPES)
    assert {c.decay_fraction for c in cells} == {0.2}
    assert all(c.column is None for c in spec_cells(spec({"schedule": "cosine"})))
    off = spec()
    off.branch = "off"  # the spec's `branch` key (read with getattr: specs without it branch on auto)
    assert branching(off) is None and all(c.column is None for c in spec_cells(off))
    assert all(c.column is None for c in spec_cells(spec(), branch=False))  # a trainer that cannot branch


@pytest.fixture(scope="module")
def branch_sweep(tmp_path_factory):
    """The WSD sweep searched with trunks, every proposed batch recorded."""
    cells = spec_cells(spec())
    planner = AdaptivePlanner(cells, AdaptiveSettings())
    batches, propose = [], planner.propose

    def recording(views):
        runs = propose(views)
        batches.append((set(views), runs))
        return runs

    planner.propose = recording
    out = tmp_path_factory.mktemp("branch")
    summary = run_sweep([], out, lambda: InlineExecutor(landscape_run, capacity=4, run_dirs=False), progress=False,
                        planner=planner)
    return cells, planner, batches, summary


def test_a_point_is_proposed_for_its_columns_shorter_budgets_at_once(branch_sweep):
    cells, planner, batches, _ = branch_sweep
    by_column = {}
    for cell in cells:
        by_column.setdefault(cell.column, []).append(cell)
    ran = set()
    trunks_of_several = 0
    for stored, runs in batches:
        new = [r for r in runs if r.run_id() not in stored and r.run_id() not in ran]
        groups = {}
        for run in new:
            cell = planner.by_key[cell_key(run.to_dict())]
            groups.setdefault((cell.column, run.lr, run.batch_tokens), []).append(run)
        for (column, lr, bs), members in groups.items():
            top = max(r.tokens for r in members)
            expected = {c.D for c in by_column[column] if c.D <= top and c.index_of(lr, bs) is not None
                        and c.make(*c.index_of(lr, bs)).run_id() not in ran | stored}
            assert {r.tokens for r in members} == expected  # every shorter budget that lacks the point, at once
            trunks_of_several += len(members) > 1
        ran |= {r.run_id() for r in new}
    assert trunks_of_several > 0


def test_branch_sweep_brackets_every_cell_near_its_optimum_for_less(branch_sweep, tmp_path):
    cells, planner, batches, summary = branch_sweep
    assert {c["state"] for c in summary.cells} == {"bracketed"}
    for report, cell in zip(summary.cells, cells):
        lr_star, bs_star = optimum(cell.make(0, 0).model.d_model, int(cell.D))
        assert abs(math.log(report["best_lr"] / lr_star)) < 1.0 and abs(math.log(report["best_batch_tokens"] / bs_star)) < 1.1
    ran, used, alone = set(), 0.0, 0.0
    for stored, runs in batches:
        new = [r for r in runs if r.run_id() not in stored and r.run_id() not in ran]
        ran |= {r.run_id() for r in new}
        u, a = planner.batch_cost(new)
        used, alone = used + u, alone + a
    assert used < 0.8 * alone  # shorter budgets cost their cooldowns only
    lone = AdaptivePlanner(spec_cells(spec(), branch=False), AdaptiveSettings())
    assert lone.batch_cost(new) == (alone_of(new), alone_of(new))


def alone_of(runs):
    return float(sum(r.tokens for r in runs))


def test_batch_cost_is_the_trunk_cost_model():
    cells = spec_cells(spec())
    planner = AdaptivePlanner(cells, AdaptiveSettings())
    column = [c for c in cells if c.column == cells[0].column]
    i, j = column[0].index_of(column[0].lrs[30], column[0].batch_sizes[1])
    runs = [c.make(i, j) for c in column]
    assert planner.batch_cost(runs) == (pytest.approx(trunk_tokens(TOKENS, 0.2)), float(sum(TOKENS)))
    other = [c for c in cells if c.column != cells[0].column][0].make(i, j)
    assert planner.batch_cost(runs[:1] + [other]) == (2 * TOKENS[0], 2 * TOKENS[0])  # two trunks of one: alone
