"""The time split behind the analysis's and the fuser's debug lines."""

import threading
import time

import pytest

from cpift_dist.timing import TimeSplit


@pytest.mark.timeout(30)
def test_a_time_split_sums_its_blocks_over_threads_and_counts_a_block_that_raises():
    split = TimeSplit("reads", "loops")
    before = split.snapshot()
    start = threading.Barrier(3)

    def work():
        start.wait()
        for _ in range(4):
            with split.timed("reads"):
                time.sleep(0.02)

    threads = [threading.Thread(target=work) for _ in range(3)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    with pytest.raises(ValueError), split.timed("loops"):
        time.sleep(0.03)
        raise ValueError
    spent = split.since(before)
    # 3 threads x 4 x 20 ms of reads at once: summed, more than the wall time they took
    assert spent["reads"] >= 0.24 and spent["reads"] > wall
    assert 0.03 <= spent["loops"] < 0.03 + 0.5
    assert TimeSplit.rest(1.0, spent) == pytest.approx(1.0 - spent["reads"] - spent["loops"])
    assert split.since(split.snapshot()) == {"reads": 0.0, "loops": 0.0}
