"""Admission control (cifar_core/admission.py): a full line is refused at once, a long wait is refused
after its limit, and the gate recovers. Threads and events only: no model, no clock assertions."""
import threading
import time

import pytest

from cifar_core.admission import Admission, Busy, Limits


def hold(gate: Admission, entered: threading.Event, release: threading.Event, outcome: list):
    try:
        with gate.admit():
            entered.set()
            release.wait(30)
        outcome.append("ran")
    except Busy as e:
        outcome.append(e)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the gate's state"
        time.sleep(0.005)


def test_full_line_is_refused_at_once_and_the_waiting_one_runs_later():
    gate = Admission(Limits(workers=1, waiting=1, wait_s=30))
    release = threading.Event()
    first, second = threading.Event(), threading.Event()
    outcomes: list = []
    runner = threading.Thread(target=hold, args=(gate, first, release, outcomes))
    runner.start()
    assert first.wait(10)
    waiter = threading.Thread(target=hold, args=(gate, second, release, outcomes))
    waiter.start()
    wait_for(lambda: gate.depth()["waiting"] == 1)
    assert gate.depth()["running"] == 1

    with pytest.raises(Busy) as refused:  # the line (1) is full: refused now, not after a wait
        with gate.admit():
            pass
    assert "busy" in refused.value.message and "at most 1 may wait" in refused.value.message
    assert refused.value.retry_after_s >= 1

    release.set()
    runner.join(10)
    waiter.join(10)
    assert outcomes == ["ran", "ran"] and second.is_set()
    depth = gate.depth()
    assert (depth["running"], depth["waiting"], depth["refused"]) == (0, 0, 1)


def test_a_wait_past_the_limit_is_refused_and_the_gate_recovers():
    gate = Admission(Limits(workers=1, waiting=4, wait_s=0.2))
    release, entered = threading.Event(), threading.Event()
    outcomes: list = []
    runner = threading.Thread(target=hold, args=(gate, entered, release, outcomes))
    runner.start()
    assert entered.wait(10)
    with pytest.raises(Busy, match="no worker was free within 0.2 s"):
        with gate.admit():
            pass
    release.set()
    runner.join(10)
    with gate.admit():  # free again
        assert gate.depth()["running"] == 1
    assert gate.depth() | {"refused": None} == {"running": 0, "waiting": 0, "refused": None, "workers": 1,
                                                "max_waiting": 4, "max_wait_s": 0.2}


def test_an_error_inside_releases_the_worker():
    gate = Admission(Limits(workers=1, waiting=0, wait_s=1))
    with pytest.raises(RuntimeError):
        with gate.admit():
            raise RuntimeError("boom")
    with gate.admit():
        pass
    assert gate.depth()["running"] == 0


@pytest.mark.parametrize("bad", [dict(workers=0), dict(waiting=-1), dict(wait_s=0)])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ValueError, match="workers >= 1"):
        Limits(**bad)
