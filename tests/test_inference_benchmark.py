"""benchmarks/inference.py's timing loop: what one sample measures."""

import pytest
import torch

from .conftest import load_benchmark


def test_interleaved_times_blocks_of_calls_per_call(monkeypatch):
    """``block=K``: every sample is K calls in a row divided by K, each call warmed up twice first."""
    bench = load_benchmark("inference")
    clock = iter(range(10_000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    counts = {"a": 0, "b": 0}

    def counter(name):
        def call():
            counts[name] += 1
            next(clock)  # one tick per call

        return call

    times = bench.interleaved({"a": counter("a"), "b": counter("b")}, repeats=3, device=torch.device("cpu"), block=4)
    assert counts == {"a": 2 + 3 * 4, "b": 2 + 3 * 4}
    # Each sample spans the 4 calls' ticks plus the tick of reading the clock: 5 ticks over 4 calls.
    assert times == {"a": [1.25] * 3, "b": [1.25] * 3}


@pytest.mark.parametrize("flag", ["--block", "--batches"])
def test_nonpositive_counts_are_refused(flag, capsys):
    bench = load_benchmark("inference")
    with pytest.raises(SystemExit):
        bench.main([flag, "0"])
    assert f"{flag} must be positive" in capsys.readouterr().err
