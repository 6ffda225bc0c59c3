"""Concurrent requests share forward passes (cifar_core/batching.py): a lone request runs alone and at
once, a burst is answered in batches, each caller gets its own answer, errors reach exactly the callers of
the failing batch, and the serving core's batched answers equal its one-by-one answers."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cifar_core.batching import Batcher


class Gated:
    """fn for Batcher: records its batches; the first call blocks until released, so a burst piles up."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(30)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [10 * x for x in items]


def wait_pending(batcher, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(batcher._pending) < n:
        assert time.monotonic() < deadline, "the burst never queued up"
        time.sleep(0.005)


def test_a_lone_request_runs_alone():
    fn = Gated()
    fn.release.set()
    batcher = Batcher(fn, max_batch=8)
    assert batcher.submit(3) == 30
    assert fn.batches == [[3]]


def test_a_burst_is_answered_in_batches_each_caller_its_own_answer():
    fn = Gated()
    batcher = Batcher(fn, max_batch=4)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, 0)
        assert fn.entered.wait(10)
        rest = [pool.submit(batcher.submit, i) for i in range(1, 8)]
        wait_pending(batcher, 7)
        fn.release.set()
        answers = [first.result(30)] + [f.result(30) for f in rest]
    assert answers == [10 * i for i in range(8)]
    assert fn.batches[0] == [0]
    assert sorted(x for b in fn.batches[1:] for x in b) == list(range(1, 8))  # each item computed once
    assert all(len(b) <= 4 for b in fn.batches) and len(fn.batches) == 3  # 1, then 4 + 3 (max_batch 4)
    assert (batcher.batches, batcher.items) == (3, 8)


def test_an_error_reaches_the_callers_of_its_batch_only():
    fn = Gated(fail_on=5)
    batcher = Batcher(fn, max_batch=8)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batcher.submit, 1)
        assert fn.entered.wait(10)
        burst = [pool.submit(batcher.submit, i) for i in (5, 6)]
        wait_pending(batcher, 2)
        fn.release.set()
        assert first.result(30) == 10
        for f in burst:
            with pytest.raises(ValueError, match="bad item 5"):
                f.result(30)
    assert batcher.submit(7) == 70  # the batcher still serves


def test_bad_max_batch_is_refused():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda items: items, max_batch=0)


def test_concurrent_predictions_equal_one_by_one_predictions(tmp_path):
    from cifar_core.serving import Lab
    from demo.testing import make_fake_zoo
    root = make_fake_zoo(tmp_path / "zoo", n_models=2)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(16)]
    one_by_one = Lab(root)
    alone = [one_by_one._predict_batch([(f"k{i}", x)])[0] for i, x in enumerate(images)]
    lab = Lab(root)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lab.predict, images))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(b.probs, a.probs, rtol=1e-5, atol=1e-6)
        for name in a.members:
            np.testing.assert_allclose(b.members[name], a.members[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(b.image, a.image) and b.top == a.top
    assert lab._batcher.items == len(images)
