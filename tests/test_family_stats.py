"""A family's registration-time sample: every time up to TIME_SAMPLES, a uniform sample beyond (its median
interval is what reports show for a family of thousands)."""

from __future__ import annotations

import itertools
import random
import statistics

from reaper.analysis.model import TIME_SAMPLES, ClientRow, FamilyStats, Verdict


def test_the_sample_beyond_its_size_is_uniform_over_the_members() -> None:
    rng = random.Random(7)
    members, deciles = 50_000, [0] * 10
    for _ in range(20):
        fam = FamilyStats("f", None, "")
        for i in range(members):
            fam._sample(float(i), rng)
        assert len(fam._times) == TIME_SAMPLES
        assert len(set(fam._times)) == TIME_SAMPLES  # a member is sampled at most once
        for t in fam._times:
            deciles[int(t * 10 // members)] += 1
    expected = 20 * TIME_SAMPLES / 10
    chi2 = sum((n - expected) ** 2 / expected for n in deciles)
    assert chi2 < 27.9, deciles  # 9 degrees of freedom, p = 0.001


def test_a_big_familys_median_interval_is_estimated_from_its_sample() -> None:
    rng = random.Random(3)
    fam = FamilyStats("f", None, "")
    t, times = 1_700_000_000.0, []
    for _ in range(20_000):  # registrations at random, one a minute on average
        t += rng.expovariate(1 / 60)
        times.append(t)
    shuffled = random.Random(4).sample(times, len(times))  # members arrive in any order
    for i, t in enumerate(shuffled):
        row = ClientRow(f"c{i}", f"c{i}", t)
        fam.add(row, (t, float("-inf"), row.key), Verdict.ORPHAN, times[0], rng)
    assert fam.members == 20_000 and len(fam._times) == TIME_SAMPLES
    true_median = statistics.median(b - a for a, b in itertools.pairwise(times))
    assert fam.median_interval is not None
    assert abs(fam.median_interval - true_median) < 0.1 * true_median
