"""Progress lines and ETAs (invasive_dist/progress.py): what a log file and a terminal show."""

import io

from invasive_dist.progress import ETA, Progress, format_duration, track


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 75, 3725, None, float("inf"))] == [
        "0:00",
        "1:15",
        "1:02:05",
        "?",
        "?",
    ]


def test_log_file_gets_periodic_lines_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    with Progress("data check", total=100, unit="img", stream=out, interval_s=30, clock=clock) as p:
        for _ in range(100):
            clock.t += 1.0  # 1 img/s: lines at 30, 60, 90 s, then the closing line
            p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "[data check] 30/100 img (30%), 1.0 img/s, elapsed 0:30, ETA 1:10"
    assert lines[-1].endswith("100/100 img (100%), 1.0 img/s, elapsed 1:40, done")


def test_short_phase_in_a_log_file_is_quiet_and_other_ranks_print_nothing():
    out, clock = io.StringIO(), Clock()
    with Progress("synth", total=3, stream=out, interval_s=30, clock=clock) as p:
        p.update(3)
    assert out.getvalue() == ""
    quiet = io.StringIO()
    list(track(range(5), "validation", enabled=False, stream=quiet, interval_s=0))
    assert quiet.getvalue() == ""


def test_terminal_gets_a_bar_redrawn_in_place():
    out, clock = Tty(), Clock()
    with Progress("predict", total=4, unit="batch", stream=out, clock=clock) as p:
        for _ in range(4):
            clock.t += 0.5
            p.update(1)
    text = out.getvalue()
    assert text.count("\r") >= 4 and text.endswith("\n") and text.count("\n") == 1
    assert "100%|####################| 4/4 batch [0:02<0:00, 2.0 batch/s]" in text


def test_eta_counts_only_the_steps_timed_here():
    clock = Clock()
    eta = ETA(total=100, done=40, clock=clock)  # resumed at step 40
    assert eta.line(40) == "?"
    clock.t += 10.0
    assert eta.remaining_s(50) == 50.0  # 10 steps in 10 s, 50 left
