"""The benchmarks' timing helpers, on a fake clock (what they compute, not how fast)."""

from kvpress_rs.bench.measure import median_seconds, paired_median_seconds


def fake_clock(durations: dict[str, list[float]]):
    """A clock and two functions that advance it by their next duration, logging calls."""
    now, calls = [0.0], []

    def make(name):
        def fn():
            calls.append(name)
            now[0] += durations[name].pop(0)

        return fn

    return (lambda: now[0]), make("f"), make("base"), calls


def test_paired_medians_alternate_the_two_functions_after_a_warm_up_each():
    # Warm-ups first (100 s, never counted), then f / base in turn.
    clock, f, base, calls = fake_clock({"f": [100.0, 1.0, 9.0, 3.0], "base": [100.0, 5.0, 4.0, 8.0]})
    fast, slow = paired_median_seconds(f, base, repeats=3, clock=clock)
    assert (fast, slow) == (3.0, 5.0)
    assert calls == ["f", "base"] * 4


def test_median_seconds_skips_its_warm_up():
    clock, f, _, calls = fake_clock({"f": [100.0, 2.0, 7.0, 1.0], "base": []})
    assert median_seconds(f, repeats=3, clock=clock) == 2.0
    assert calls == ["f"] * 4
