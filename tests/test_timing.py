"""Per-request stage timings (cifar_core/timing.py): recorded only inside a record, nested records
add to the outer one, the log summarizes per source, and Server-Timing is well formed."""
import re
import threading

from cifar_core import timing


def test_stages_outside_a_record_cost_nothing_and_log_nothing():
    timing.recent(clear=True)
    with timing.stage("decode"):
        pass
    assert timing.recent() == []


def test_a_record_collects_stages_and_total_and_nested_records_join_the_outer():
    timing.recent(clear=True)
    with timing.record("test:outer") as stages:
        with timing.stage("decode"):
            pass
        with timing.stage("forward:m"):
            pass
        with timing.stage("forward:m"):  # the same stage twice adds up
            pass
        with timing.record("test:inner") as inner:
            assert inner is stages
            with timing.stage("ood"):
                pass
    assert set(stages) == {"decode", "forward:m", "ood", timing.TOTAL}
    assert stages[timing.TOTAL] >= stages["forward:m"] >= 0
    rows = timing.recent()
    assert [s for s, _ in rows] == ["test:outer"]  # the inner record logged nothing of its own


def test_records_on_other_threads_stay_apart():
    timing.recent(clear=True)
    seen = {}

    def request(name):
        with timing.record(f"test:{name}") as stages:
            with timing.stage(name):
                pass
        seen[name] = set(stages)
    threads = [threading.Thread(target=request, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {n: {n, timing.TOTAL} for n in ("a", "b", "c")}


def test_summary_counts_per_source_and_stage():
    rows = [("rest:predict", {"decode": 0.001, "total": 0.010}), ("rest:predict", {"decode": 0.003, "total": 0.030}),
            ("gradio:predict", {"cached": 0.0, "total": 0.001})]
    out = timing.summary(rows)
    assert out["rest:predict"]["n"] == 2 and out["gradio:predict"]["n"] == 1
    assert out["rest:predict"]["stages"]["decode"] == {"n": 2, "p50_ms": 2.0, "p95_ms": 2.9}
    assert "decode" not in out["gradio:predict"]["stages"]


def test_server_timing_header_is_well_formed():
    header = timing.server_timing({"forward:tf_efficientnet_lite0": 0.0123, "total": 0.05})
    assert header == "forward-tf_efficientnet_lite0;dur=12.300, total;dur=50.000"
    assert all(re.fullmatch(r"[\w.-]+;dur=[\d.]+", part) for part in header.split(", "))
