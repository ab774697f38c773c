import io

import pytest

from steplaw.progress import ProgressLine, format_duration
from steplaw.sweep.driver import describe_progress


@pytest.mark.parametrize("seconds, text", [(None, "?"), (float("inf"), "?"), (5.4, "5s"), (75, "1m15s"), (7260, "2h01m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_live_line_redraws_in_place():
    stream = io.StringIO()
    line = ProgressLine(10, stream=stream, live=True)
    line.update(3, 2, 1, 42.0, "run abc 50% loss 2.000", force=True)
    line.update(4, 2, 1, 30.0, force=True)
    line.finish("done")
    text = stream.getvalue()
    assert text.startswith("\rsweep: 3/10 done, 2 running, 1 failed, ETA 42s | run abc 50% loss 2.000")
    assert "\rsweep: 4/10 done, 2 running, 1 failed, ETA 30s" in text and text.endswith("done\n")


def test_log_mode_is_throttled():
    stream = io.StringIO()
    line = ProgressLine(10, stream=stream, live=False, log_interval_s=3600)
    for done in range(5):
        line.update(done, 1, 0, None)
    assert stream.getvalue().count("\n") == 1


def test_describe_progress():
    info = {"tokens": 512, "total_tokens": 2048, "loss": 3.14159, "eta_s": 1.0}
    assert describe_progress("0123456789abcdef", info) == "run 01234567 25% loss 3.142"


@pytest.mark.parametrize("elapsed, finished, remaining, done_cost, total_cost, expected", [
    (10.0, 0, 5, 0.0, 10.0, None),
    (10.0, 5, 5, 5.0, 10.0, 10.0),  # both estimates agree
    (10.0, 5, 5, 8.0, 10.0, (2.5 + 10.0) / 2),  # cost says 2.5 s, count says 10 s
])
def test_eta(elapsed, finished, remaining, done_cost, total_cost, expected):
    from steplaw.sweep.driver import _eta

    assert _eta(elapsed, finished, remaining, done_cost, total_cost) == (pytest.approx(expected) if expected else None)


def test_clear_wipes_the_live_line_once():
    stream = io.StringIO()
    line = ProgressLine(10, stream=stream, live=True)
    line.show("sweep: 1/10 done", force=True)
    line.clear()
    assert stream.getvalue() == "\rsweep: 1/10 done" + "\r" + " " * 16 + "\r"
    line.clear()  # nothing drawn since: nothing to wipe
    assert stream.getvalue().count("\r") == 3
    logged = io.StringIO()
    ProgressLine(10, stream=logged, live=False).clear()  # a log has no line to wipe
    assert logged.getvalue() == ""


def test_driver_warning_clears_the_line_and_goes_through_warn(capsys):
    from steplaw.sweep.driver import _warn

    stream = io.StringIO()
    line = ProgressLine(10, stream=stream, live=True)
    line.show("sweep: 1/10 done", force=True)
    shown = set()
    _warn(line, "stacks of 8 runs do not fit", shown)
    _warn(line, "stacks of 8 runs do not fit", shown)  # once per sweep
    assert stream.getvalue().endswith("\r" + " " * 16 + "\r") and line.width == 0
    assert capsys.readouterr().err == "steplaw sweep: warning: stacks of 8 runs do not fit\n"


def test_training_progress_is_a_progress_line():
    from steplaw.train.tracking import stderr_progress

    info = {"tokens": 500_000, "total_tokens": 2_000_000, "loss": 3.14159, "tokens_per_s": 1000.0, "eta_s": 75.0}
    stream = io.StringIO()
    report = stderr_progress(ProgressLine(stream=stream, live=True))
    report(info)
    report({**info, "tokens": 2_000_000, "eta_s": 0.0, "done": True})
    text = stream.getvalue()
    assert text.startswith("\r    0.50M / 2.00M tokens  loss 3.1416  1,000 tok/s  ETA 1m15s")
    assert text.endswith("    2.00M / 2.00M tokens  loss 3.1416  1,000 tok/s  ETA 0s\n")  # the last line stays
    logged = io.StringIO()
    report = stderr_progress(ProgressLine(stream=logged, live=False))
    report(info)
    report({**info, "done": True})
    assert "\r" not in logged.getvalue() and logged.getvalue().count("\n") == 2  # a log gets plain lines
