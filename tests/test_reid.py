"""Re-identification statistics against hand-computed values and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synthgen.audit.reid import (
    chance_normalised,
    hanley_mcneil_interval,
    nearest_similarity,
    normalise,
    rank_sources,
    rate_estimate,
    summarise_level,
    verification_auc,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("hits", "n", "low", "high"),
    [
        # p = k/n, z = 1.96: centre = (p + z²/2n) / (1 + z²/n),
        # half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n); worked by hand to 4 places.
        (0, 10, 0.0, 0.2775),  # upper = (z²/n) / (1 + z²/n) = 0.38415 / 1.38415
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),  # centre 0.5, half = 1.96·sqrt(0.025 + 0.0096)/1.38415
        (40, 40, 0.9124, 1.0),  # lower = 40 / (40 + 3.8415)
        (1, 40, 0.0044, 0.1288),  # centre 0.06664, half 0.06222
        (1, 20, 0.0089, 0.2361),
    ],
)
def test_wilson_interval_matches_hand_computed_values(hits, n, low, high):
    got_low, got_high = wilson_interval(hits, n)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_wilson_interval_is_symmetric_and_contains_the_rate():
    for n in (1, 7, 50, 1000):
        for hits in range(0, n + 1, max(1, n // 7)):
            low, high = wilson_interval(hits, n)
            assert low <= hits / n <= high
            mirrored = wilson_interval(n - hits, n)
            assert mirrored == pytest.approx((1 - high, 1 - low), abs=1e-12)


def test_chance_normalised_risk():
    assert chance_normalised(0.25, 0.25) == 0.0
    assert chance_normalised(1.0, 0.01) == 1.0
    assert chance_normalised(0.5, 0.25) == pytest.approx(1 / 3)
    assert chance_normalised(0.0, 0.2) == pytest.approx(-0.25)  # worse than chance is negative


def test_rate_estimate_reports_chance_risk_and_interval():
    rate = rate_estimate(3, 40, chance=1 / 40)
    assert rate.value == 0.075
    assert rate.ci95 == wilson_interval(3, 40)
    assert rate.chance == 1 / 40
    assert rate.risk == pytest.approx((0.075 - 0.025) / 0.975)
    assert rate.risk_ci95[0] == pytest.approx(chance_normalised(rate.ci95[0], 0.025))
    assert not rate.at_chance  # lower bound 0.0258 > chance 0.025: better than guessing
    assert rate_estimate(2, 40, chance=1 / 40).at_chance  # lower bound 0.0138
    assert rate.to_dict()["direction"] == "lower is more private"


def test_hanley_mcneil_interval_by_hand():
    # AUC 0.5, 10 v 10: Q1 = Q2 = 1/3, var = (0.25 + 9/12 + 9/12) / 100 = 0.0175
    low, high = hanley_mcneil_interval(0.5, 10, 10)
    half = 1.959963984540054 * math.sqrt(0.0175)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))


def _unit(angles_deg):
    radians = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return torch.tensor(np.stack([np.cos(radians), np.sin(radians)], 1), dtype=torch.float32)


def test_ranks_on_hand_made_vectors():
    # Gallery on the circle at 0, 10, 90, 180 degrees; patients: {0, 10} are one patient (two eyes).
    gallery = _unit([0, 10, 90, 180])
    patient = np.array([0, 0, 1, 2])
    queries = _unit([1, 8, 100, 60])
    true_index = np.array([0, 0, 3, 1])
    result = rank_sources(queries, gallery, true_index, patient, progress=False)
    # query at 1°: nearest 0° (its source) -> rank 1
    # query at 8°: 10° is nearer than its source 0° -> image rank 2, but same patient -> rank 1
    # query at 100°: order 90, 10, 0 ... 180 is 80° away, 10° is 90° away -> 180 is rank 2
    # query at 60°: 90 (30°), 10 (50°) -> source at 10° ranks 2; patient 0 second to patient 1
    assert result.image_rank.tolist() == [1, 2, 2, 2]
    assert result.patient_rank.tolist() == [1, 1, 2, 2]
    assert result.true_similarity[0] == pytest.approx(math.cos(math.radians(1)), abs=1e-6)
    assert result.patient_similarity[1] == pytest.approx(math.cos(math.radians(2)), abs=1e-6)


def test_ties_count_for_the_attacker():
    gallery = _unit([0, 0, 90])  # two identical gallery images
    result = rank_sources(_unit([0]), gallery, np.array([1]), np.array([0, 1, 2]), progress=False)
    assert result.image_rank.tolist() == [1]


def test_blocked_search_matches_one_block():
    gen = torch.Generator().manual_seed(0)
    gallery = normalise(torch.randn(57, 6, generator=gen))
    queries = normalise(
        gallery[torch.randint(0, 57, (33,), generator=gen)]
        + 0.8 * torch.randn(33, 6, generator=gen)
    )
    true_index = np.random.default_rng(1).integers(0, 57, 33)
    patient = np.arange(57) // 3
    groups = np.arange(33) % 3
    whole = rank_sources(queries, gallery, true_index, patient, groups, progress=False)
    blocked = rank_sources(
        queries, gallery, true_index, patient, groups, block_elements=50, progress=False
    )
    np.testing.assert_array_equal(whole.image_rank, blocked.image_rank)
    np.testing.assert_array_equal(whole.patient_rank, blocked.patient_rank)
    np.testing.assert_array_equal(whole.image_impostors, blocked.image_impostors)
    np.testing.assert_array_equal(whole.patient_impostors, blocked.patient_impostors)
    # brute-force ranks
    sims = (queries @ gallery.T).numpy()
    truth = sims[np.arange(33), true_index]
    np.testing.assert_array_equal(whole.image_rank, (sims > truth[:, None]).sum(1) + 1)
    assert whole.image_impostors.sum() == 33 * 56
    assert whole.patient_impostors.sum() == 33 * 18


def test_verification_auc_matches_brute_force_mann_whitney():
    gen = torch.Generator().manual_seed(3)
    gallery = normalise(torch.randn(40, 8, generator=gen))
    true_index = np.arange(40)
    queries = normalise(gallery + 1.2 * torch.randn(40, 8, generator=gen))
    result = rank_sources(queries, gallery, true_index, np.arange(40), progress=False)
    sims = (queries @ gallery.T).numpy()
    genuine = sims[true_index, true_index]
    impostors = sims[~np.eye(40, dtype=bool)]
    brute = (
        (genuine[:, None] > impostors[None, :]) + 0.5 * (genuine[:, None] == impostors[None, :])
    ).mean()
    auc = verification_auc(result.true_similarity, result.image_impostors[0])
    assert auc == pytest.approx(brute, abs=2e-3)
    summary = summarise_level(
        result.image_rank, result.true_similarity, result.image_impostors[0], 40
    )
    assert summary.verification_auc.value == auc
    assert summary.top1.value == (result.image_rank == 1).mean()
    assert summary.top5.chance == 5 / 40
    assert summary.mean_rank.value == pytest.approx(result.image_rank.mean())


def test_nearest_similarity_excludes_the_same_patient():
    gallery = _unit([0, 5, 90, 95])
    patient = np.array([0, 0, 1, 1])
    values, index = nearest_similarity(
        gallery, gallery, query_patient=patient, gallery_patient=patient, block_elements=3
    )
    assert index[:, 0].tolist() == [2, 2, 1, 1]  # the nearest image of a different patient
    plain, plain_index = nearest_similarity(gallery, gallery, k=2)
    assert plain_index[:, 0].tolist() == [0, 1, 2, 3]
    assert plain[:, 0] == pytest.approx(1.0, abs=1e-6)
