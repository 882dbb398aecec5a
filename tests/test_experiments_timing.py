"""The shared step timer: every batch stepped once, in order, and the time it took."""

import time

from experiments.timing import seconds_of, time_steps


def test_time_steps_runs_every_batch_in_order_and_times_them():
    seen = []
    seconds = time_steps(lambda b: (seen.append(b), time.sleep(0.001)), [3, 1, 2])
    assert seen == [3, 1, 2] and seconds >= 0.003
    assert seconds_of(lambda: None) < seconds
