"""Reading run tables: formats, column mapping, units and clear errors."""
import json
import sys

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
    row = {k: v for k, v in ROWS[0].items() if k != "batch_tokens"}
    with pytest.raises(UserError, match="seq-len"):
        read_runs([dict(row, batch_seqs=128)])


def test_sequence_column_is_used():
    row = {k: v for k, v in ROWS[0].items() if k != "batch_tokens"}
    assert read_runs([dict(row, batch_seqs=64, seq_len=1024)]).batch_tokens[0] == 64 * 1024


# Issue 12.1: the batch unit comes from --bs-unit or the column's name, never from the numbers.
@pytest.mark.parametrize("column, bs_unit, seq_len, expected", [
    ("batch_tokens", None, None, 256),  # a tiny token batch stays tokens: no heuristic
    ("batch_tokens", "tokens", None, 256),
    ("batch_seqs", None, 64, 256 * 64),
    ("batch_sequences", None, 64, 256 * 64),
    ("bs", "tokens", None, 256),
    ("bs", "sequences", 2048, 256 * 2048),
])
def test_batch_unit_from_flag_or_name(column, bs_unit, seq_len, expected):
    rows = [dict({k: v for k, v in r.items() if k != "batch_tokens"}, **{column: 256}) for r in ROWS]
    table = read_runs(rows, col_bs=None if column.startswith("batch_") else column, bs_unit=bs_unit, seq_len=seq_len)
    assert table.batch_tokens[0] == expected
    assert not any("sequences" in w for w in table.warnings)


@pytest.mark.parametrize("seq_len_column", [None, 64, 2048])
def test_generic_batch_column_without_unit_is_refused(seq_len_column):
    # Issue 12.1 (a)/(b): sequence counts that are powers of two >= seq_len, or above any
    # cutoff, used to pass silently as tokens; a generic name now always asks for --bs-unit.
    rows = [dict({k: v for k, v in r.items() if k != "batch_tokens"}, bs=45056) for r in ROWS]
    if seq_len_column:
        rows = [dict(r, seq_len=seq_len_column) for r in rows]
    with pytest.raises(UserError, match="--bs-unit") as info:
        read_runs(rows, col_bs="bs")
    assert "'bs'" in str(info.value) and str(info.value).count(". ") == 0


def test_flag_that_contradicts_the_column_name_is_refused():
    with pytest.raises(UserError, match="counts tokens by its name but --bs-unit sequences"):
        read_runs(ROWS, bs_unit="sequences", seq_len=2048)


def test_sweep_export_rows_read_as_tokens():
    rows = [dict(r, seq_len=64, batch_tokens=128) for r in ROWS]  # 2 sequences of 64: still tokens
    assert read_runs(rows).batch_tokens[0] == 128


def test_byte_order_mark_is_read(tmp_path):
    path = _write_csv(tmp_path / "bom.csv", ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    table = read_runs(path)
    assert table.N[4] == 2e8 and len(table) == 5


def test_latin1_csv_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("N,D,lr,batch_tokens,loss,note\n1e8,2e9,1e-3,262144,3.0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9"):
        read_runs(path)


@pytest.mark.parametrize("loss", [-0.5, 0.0])
def test_non_positive_loss_of_a_finished_run_is_refused(loss):
    rows = [dict(ROWS[0], loss=loss)] + ROWS[1:]
    with pytest.raises(UserError, match="row 1: a finished run's loss is"):
        read_runs(rows)


def test_loss_table_needs_no_lr_or_batch():
    rows = [{"N": r["N"], "D": r["D"], "C": 6 * r["N"] * r["D"], "loss": r["loss"], "status": r["status"]} for r in ROWS]
    table = read_runs(rows, needs="loss")
    assert not table.has_hparams and np.isnan(table.lr).all() and table.n_valid == 2
    with pytest.raises(UserError, match="no column 'lr'"):
        read_runs(rows)


def test_loss_table_errors_name_only_what_it_needs():
    rows = [{"N": 1e8, "tokens": 2e9, "loss": 3.0}]
    with pytest.raises(UserError) as info:
        read_runs(rows, needs="loss")
    assert "'D'" in str(info.value) and "lr" not in str(info.value).split(";")[0]


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


def test_directory_is_for_the_cli_to_resolve(tmp_path):
    # steplaw.laws imports nothing from steplaw.sweep: a sweep directory is read by the CLI.
    (tmp_path / "runs.sqlite").write_bytes(b"")
    with pytest.raises(UserError, match="export_rows"):
        read_runs(tmp_path)


def test_rows_with_a_source_name():
    with pytest.raises(UserError, match="sweeps/a row 1"):
        read_runs([dict(ROWS[0], N="x")], source_name="sweeps/a")


def test_unfinished_rows_without_numbers_are_dropped_and_counted():
    rows = [dict(r) for r in ROWS] + [{"status": "pending", "N": 1e8, "D": 2e9, "lr": None, "batch_tokens": None,
                                       "loss": None}]
    table = read_runs(rows)
    assert len(table) == 5 and table.dropped["pending"] == 1
