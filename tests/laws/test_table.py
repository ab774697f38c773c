"""Reading run tables: formats, column mapping, units and clear errors."""
import json
import sys
import types

import numpy as np
import pytest

from steplaw.errors import UserError
from steplaw.laws.table import read_runs

ROWS = [
    {"run_id": "a", "status": "ok", "N": 1e8, "D": 2e9, "lr": 1e-3, "batch_tokens": 262144, "loss": 3.1},
    {"run_id": "b", "status": "diverged", "N": 1e8, "D": 2e9, "lr": 8e-3, "batch_tokens": 262144, "loss": None},
    {"run_id": "c", "status": "ok", "N": 1e8, "D": 2e9, "lr": 2e-3, "batch_tokens": 524288, "loss": "nan"},
    {"run_id": "d", "status": "failed", "N": 1e8, "D": 2e9, "lr": 2e-3, "batch_tokens": 131072, "loss": 9.0},
    {"run_id": "e", "status": "ok", "N": 2e8, "D": 2e9, "lr": 1e-3, "batch_tokens": 262144, "loss": 3.0},
]


def _write_csv(path, rows, header=None):
    header = header or list(rows[0])
    lines = [",".join(header)] + [",".join("" if r.get(h) is None else str(r.get(h)) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "rows"])
def test_formats_read_alike(tmp_path, fmt):
    if fmt == "csv":
        source = _write_csv(tmp_path / "runs.csv", ROWS)
    elif fmt == "jsonl":
        source = tmp_path / "runs.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    else:
        source = ROWS
    table = read_runs(source)
    assert len(table) == 5
    assert table.valid.tolist() == [True, False, False, False, True]
    assert table.dropped == {"diverged": 1, "failed": 1, "nan_loss": 1}
    assert table.N[4] == 2e8 and table.batch_tokens[0] == 262144


def test_column_mapping_and_sequences(tmp_path):
    rows = [{"params": 1e8, "tokens": 2e9, "peak_lr": 1e-3, "bsz": 128, "final": 3.0}]
    path = _write_csv(tmp_path / "other.csv", rows)
    table = read_runs(path, col_N="params", col_D="tokens", col_lr="peak_lr", col_bs="bsz", col_loss="final",
                      bs_unit="sequences", seq_len=2048)
    assert table.batch_tokens[0] == 128 * 2048
    assert table.warnings == []


def test_sequences_need_a_length():
    with pytest.raises(UserError, match="seq-len"):
        read_runs([dict(ROWS[0])], bs_unit="sequences")


def test_sequence_column_is_used():
    row = dict(ROWS[0], batch_tokens=64, seq_len=1024)
    assert read_runs([row], bs_unit="sequences").batch_tokens[0] == 64 * 1024


def test_batch_that_looks_like_sequences_warns():
    rows = [dict(r, batch_tokens=256) for r in ROWS]
    table = read_runs(rows)
    assert any("looks like sequences" in w for w in table.warnings)


@pytest.mark.parametrize(
    "seq_len, warns",
    [
        (64, False),  # 256 tokens = 4 whole sequences of 64: plainly tokens (a tiny sweep)
        (2048, True),  # a "batch" of 256 shorter than one sequence: really sequences
        (96, True),  # not a whole number of sequences
    ],
)
def test_seq_len_column_settles_the_batch_unit(seq_len, warns):
    rows = [dict(r, batch_tokens=256, seq_len=seq_len) for r in ROWS]
    table = read_runs(rows)
    assert any("looks like sequences" in w for w in table.warnings) == warns


def test_missing_column_names_it_and_lists_present():
    rows = [{k: v for k, v in r.items() if k != "lr"} for r in ROWS]
    with pytest.raises(UserError, match=r"no column 'lr'.*columns present: D, N, batch_tokens"):
        read_runs(rows)


@pytest.mark.parametrize("column, value, message", [
    ("N", "abc", r"row 1: column 'N' holds 'abc'"),
    ("N", -5, r"row 1: N is -5"),
    ("lr", 0, r"row 1: lr is 0"),
    ("batch_tokens", "nan", r"row 1: batch size is nan"),
])
def test_bad_numbers_name_the_row(column, value, message):
    rows = [dict(ROWS[0], **{column: value})] + ROWS[1:]
    with pytest.raises(UserError, match=message):
        read_runs(rows)


def test_no_finished_run_is_an_error():
    with pytest.raises(UserError, match="no finished run"):
        read_runs([ROWS[1], ROWS[3]])


def test_tokens_from_compute():
    rows = [{"N": 1e8, "compute": 6 * 1e8 * 4e9, "lr": 1e-3, "batch_tokens": 2**18, "loss": 3.0}]
    table = read_runs(rows, col_C="compute")
    assert table.D[0] == pytest.approx(4e9)
    assert any("C/(6N)" in w for w in table.warnings)


def test_no_tokens_and_no_compute_is_an_error():
    rows = [{"N": 1e8, "lr": 1e-3, "batch_tokens": 2**18, "loss": 3.0}]
    with pytest.raises(UserError, match="no column 'D'"):
        read_runs(rows)


def test_active_above_total_is_an_error():
    with pytest.raises(UserError, match="N_active"):
        read_runs([dict(ROWS[0], N_active=2e8)])


def test_moe_columns_kept():
    table = read_runs([dict(r, N_active=r["N"] / 4, N_total=r["N"] * 1.2) for r in ROWS])
    assert np.allclose(table.param_counts("N_active"), table.N / 4)
    assert table.param_columns() == ["N", "N_active", "N_total"]
    with pytest.raises(UserError, match="no 'N_active'"):
        read_runs(ROWS).param_counts("N_active")


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "no such file"),
    ("runs.txt", "x", "cannot tell the format"),
    ("empty.csv", "N,D,lr,batch_tokens,loss\n", "holds no runs"),
    ("bad.jsonl", '{"N": 1}\n{oops\n', "line 2 is not valid JSON"),
])
def test_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_runs(path)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "runs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="needs pyarrow"):
        read_runs(path)


def test_sweep_directory_goes_through_export_rows(tmp_path, monkeypatch):
    (tmp_path / "runs.sqlite").write_bytes(b"")
    seen = []
    fake = types.ModuleType("steplaw.sweep.store")

    def export_rows(sweep_dir):
        seen.append(sweep_dir)
        return [dict(r) for r in ROWS]

    fake.export_rows = export_rows
    monkeypatch.setitem(sys.modules, "steplaw.sweep.store", fake)
    table = read_runs(tmp_path)
    assert seen == [tmp_path] and len(table) == 5


def test_directory_without_store_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no runs.sqlite"):
        read_runs(tmp_path)


def test_unfinished_rows_without_numbers_are_dropped_and_counted():
    rows = [dict(r) for r in ROWS] + [{"status": "pending", "N": 1e8, "D": 2e9, "lr": None, "batch_tokens": None,
                                       "loss": None}]
    table = read_runs(rows)
    assert len(table) == 5 and table.dropped["pending"] == 1
