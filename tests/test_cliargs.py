"""steplaw.cli.args: argument types, output-path checks, one-line errors (and the helpers of
steplaw.errors the commands use: config_errors, warn)."""
from __future__ import annotations

import argparse
import os

import pytest

from steplaw.cli import args as cliargs
from steplaw.errors import UserError, config_errors, warn


@pytest.mark.parametrize("parse,text,value", [
    (cliargs.count, "2M", 2_000_000),
    (cliargs.count, "1e9", 10**9),
    (cliargs.count, "1.5k", 1500),
    (cliargs.count, " 32768 ", 32768),
    (cliargs.quantity, "2.5", 2.5),
    (cliargs.quantity, "1e21", 1e21),
    (cliargs.positive_int, "8", 8),
    (cliargs.nonnegative_int, "0", 0),
    (cliargs.positive_float, "3e-3", 3e-3),
    (cliargs.nonnegative_float, "0", 0.0),
    (cliargs.finite_float, "-2.5", -2.5),
])
def test_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse,text,words", [
    (cliargs.count, "nan", "not a number"),
    (cliargs.count, "0", "positive"),
    (cliargs.count, "-3M", "positive"),
    (cliargs.count, "1.5", "whole"),
    (cliargs.count, "1e400", "finite"),
    (cliargs.quantity, "0", "positive"),
    (cliargs.positive_int, "0", ">= 1"),
    (cliargs.positive_int, "8k", "not a whole number"),
    (cliargs.positive_int, "2.0", "not a whole number"),
    (cliargs.nonnegative_int, "-1", ">= 0"),
    (cliargs.positive_float, "0", "> 0"),
    (cliargs.positive_float, "inf", "finite"),
    (cliargs.nonnegative_float, "-5", ">= 0"),
    (cliargs.nonnegative_float, "nan", "finite"),
    (cliargs.finite_float, "-inf", "finite"),
    (cliargs.finite_float, "x", "not a number"),
])
def test_types_refuse_with_argparse_error(parse, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=words) as info:
        parse(text)
    assert repr(text) in str(info.value)


def _parser():
    parser = cliargs.Parser(prog="steplaw")
    sub = parser.add_subparsers(dest="command", required=True)
    outer = sub.add_parser("data")
    inner = outer.add_subparsers(dest="data_command", required=True).add_parser("prepare")
    inner.add_argument("--lr", type=cliargs.positive_float, required=True)
    inner.add_argument("--n", type=cliargs.count, default=1)
    return parser


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["data", "prepare", "--lr", "-1e-3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "steplaw data prepare: error: argument --lr: '-1e-3': expected a number > 0 (see steplaw data prepare --help)\n"


def test_parser_takes_negative_numbers_as_values(capsys):
    """'-2M' and '-1e-3' reach the type (which names the problem), not 'expected one argument'."""
    for text in ("-2M", "-1e-3", "-inf"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["data", "prepare", "--lr", "1", "--n", text])
        assert f"'{text}'" in capsys.readouterr().err


def test_command_prog_names_the_innermost_command():
    args = _parser().parse_args(["data", "prepare", "--lr", "1"])
    assert args.command_prog == "steplaw data prepare"


def test_check_output_file(tmp_path):
    existing = tmp_path / "a.json"
    existing.write_text("{}")
    assert cliargs.check_output_file(existing, "--out") == existing
    deep = tmp_path / "new" / "dirs" / "fit.json"
    assert cliargs.check_output_file(deep, "--out") == deep
    assert not (tmp_path / "new").exists()  # nothing is created
    with pytest.raises(UserError, match="is a directory"):
        cliargs.check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match="is a file, not a directory"):
        cliargs.check_output_file(existing / "x.json", "--out")
    with pytest.raises(UserError, match="empty"):
        cliargs.check_output_file("", "--out")


def test_check_output_dir(tmp_path):
    assert cliargs.check_output_dir(tmp_path, "--out") == tmp_path
    assert cliargs.check_output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out '.*f' is a file: expected a directory"):
        cliargs.check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(UserError, match="is a file, not a directory"):
        cliargs.check_output_dir(tmp_path / "f" / "g", "--out")
    with pytest.raises(UserError, match="empty"):
        cliargs.check_output_dir("", "--out")


def test_check_output_refuses_unwritable_places(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            if not (os.path.isdir("/proc/1") and not os.access("/proc/1", os.W_OK)):
                pytest.skip("every directory is writable here")
            locked = "/proc/1"
        with pytest.raises(UserError, match="no permission to write"):
            cliargs.check_output_dir(f"{locked}/run", "--out")
        with pytest.raises(UserError, match="no permission to write"):
            cliargs.check_output_file(f"{locked}/a/fit.json", "--out")
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_config_errors():
    with pytest.raises(UserError, match="^spec.json: bad width$"):
        with config_errors("spec.json"):
            raise ValueError("bad width\nmore detail")
    with pytest.raises(UserError, match="^spec.json: .*takes no keyword"):
        with config_errors("spec.json"):
            dict.fromkeys(bogus=1)
    with pytest.raises(UserError, match="^as is$"):
        with config_errors("spec.json"):
            raise UserError("as is")
    with pytest.raises(KeyError):
        with config_errors("spec.json"):
            raise KeyError("a bug stays a bug")


def test_run_command_user_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("STEPLAW_TRACEBACK", raising=False)

    def user_mistake(args):
        raise UserError("lr=-1: expected a number > 0")

    assert cliargs.run_command(user_mistake, None, "steplaw x") == 2
    assert capsys.readouterr().err == "steplaw x: error: lr=-1: expected a number > 0\n"

    def unwritable(args):
        open("/nonexistent-dir/out.json", "w")

    assert cliargs.run_command(unwritable, None, "steplaw x") == 2
    assert capsys.readouterr().err == "steplaw x: error: No such file or directory: '/nonexistent-dir/out.json'\n"

    assert cliargs.run_command(lambda args: None, None, "steplaw x") == 0
    assert cliargs.run_command(lambda args: 3, None, "steplaw x") == 3


def test_run_command_keeps_bugs_and_debug_tracebacks(monkeypatch):
    def bug(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        cliargs.run_command(bug, None, "steplaw x")
    monkeypatch.setenv("STEPLAW_TRACEBACK", "1")
    with pytest.raises(UserError):
        cliargs.run_command(lambda args: (_ for _ in ()).throw(UserError("shown with its traceback")), None, "steplaw x")


def test_warn_goes_to_stderr(capsys):
    warn("batch law fitted on 2 sizes", "steplaw fit")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "steplaw fit: warning: batch law fitted on 2 sizes\n"


def test_table_column_flags_live_in_cliargs():
    # One column mapping for fit, fit-loss and sweep --replay: the flags are defined once, here.
    parser = cliargs.Parser(prog="t")
    cliargs.add_table_args(parser, with_compute=True, needs="loss")
    args = parser.parse_args(["runs.csv", "--col-N", "params", "--col-C", "flops"])
    assert (args.runs, args.col_N, args.col_C, args.table_needs) == ("runs.csv", "params", "flops", "loss")
    import steplaw.cli.laws

    assert not hasattr(steplaw.cli.laws, "add_table_args")
