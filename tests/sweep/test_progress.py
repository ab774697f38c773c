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
