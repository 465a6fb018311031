"""ChildProcess: ready lines and conditions with deadlines, and a stop that escalates SIGINT -> SIGTERM -> SIGKILL."""

from __future__ import annotations

import signal
import sys

import pytest

from lambdasplit.child import ChildProcess
from lambdasplit.errors import LambdaSplitError

# Reports each signal it gets and ignores it, so only SIGKILL ends it.
STUBBORN = """
import signal, sys, time
def note(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_stop_sends_sigint_then_sigterm_then_sigkill_to_a_child_that_ignores_them():
    child = ChildProcess([sys.executable, "-c", STUBBORN], name="the stubborn child")
    child.wait_for_line(r"^ready", timeout=60)
    assert child.stop(grace=1.0) == -signal.SIGKILL
    assert [line.strip() for line in child.output][1:] == ["got SIGINT", "got SIGTERM"]


def test_a_child_that_stops_on_sigint_gets_no_other_signal():
    child = ChildProcess([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"], name="sleeper")
    child.wait_for_line(r"^ready", timeout=60)
    assert child.stop() == -signal.SIGINT  # Python's default: KeyboardInterrupt, then death by SIGINT


def test_waiting_on_a_child_that_exits_first_says_so_with_its_output(tmp_path):
    script = "import sys; print('error: no model here', flush=True); sys.exit(3)"
    child = ChildProcess([sys.executable, "-c", script], name="the helper")
    with pytest.raises(LambdaSplitError, match="the helper exited with status 3 before it was ready; its output:\nerror: no model here"):
        child.wait_until(lambda: False, timeout=60)


def test_a_silent_child_misses_its_deadline_and_the_log_file_gets_the_output(tmp_path):
    log = tmp_path / "child.log"
    with ChildProcess([sys.executable, "-c", "print('to the log', flush=True); import time; time.sleep(120)"],
                      name="the logged child", log=log) as child:
        child.wait_until(lambda: log.read_text() != "", timeout=60)
        with pytest.raises(LambdaSplitError, match=f"the logged child did not start within 0.5 s; its output is in {log}"):
            child.wait_until(lambda: False, timeout=0.5)
        assert child.returncode == -signal.SIGINT  # a failed wait stops the child (SIGINT first)
    assert log.read_text().startswith("to the log\n")  # then Python's KeyboardInterrupt



def test_printed_waits_for_a_line_that_comes_after_ready_and_gives_up_at_its_deadline(tmp_path):
    # The child prints its line only once a file appears, so the line surely comes after the check
    # began: a server that logs an error after its client already saw the reply is this race.
    go = tmp_path / "go"
    script = (f"import os, time; print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
              "print('late line', flush=True); time.sleep(120)")
    with ChildProcess([sys.executable, "-c", script], name="the late child") as child:
        child.wait_for_line(r"^ready", timeout=60)
        assert not child.printed("late line", timeout=0.2)
        go.touch()
        assert child.printed("late line", timeout=60)
