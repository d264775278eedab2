"""scripts/tune_toy.py's choice rule: the highest mean UA among trials that keep IRA and CRA >= 70, ties in UA to
the lower target probability (the margin under a saturated UA), then to the higher IRA + CRA."""

from __future__ import annotations

import scripts.tune_toy as tune


def _trial(ua: float, ira: float, cra: float, target_p: float | None = None) -> dict:
    row = {"target": "Pop_Art", "UA": ua, "IRA": ira, "CRA": cra, "time_s": 1.0}
    return tune.summarise({}, [row if target_p is None else {**row, "target_p": target_p}])


def test_a_tie_in_ua_goes_to_the_trial_that_moved_the_target_further():
    trials = [_trial(100, 100, 100, 0.30), _trial(100, 90, 95, 0.02), _trial(100, 99, 100, 0.10)]
    assert tune.choose(trials) == 1


def test_a_higher_ua_wins_over_a_lower_margin_and_the_floor_still_holds():
    assert tune.choose([_trial(95, 100, 100, 0.01), _trial(100, 100, 100, 0.40)]) == 1
    assert tune.choose([_trial(100, 60, 100, 0.0), _trial(90, 80, 80, 0.5)]) == 1, "IRA 60 is under the floor"


def test_trials_without_a_margin_fall_back_to_ira_plus_cra():
    assert "mean_target_p" not in _trial(100, 90, 90)
    assert tune.choose([_trial(100, 90, 90), _trial(100, 95, 99)]) == 1
