"""experiments.hostile: the harness runs its cases and gives each a verdict."""

from experiments.hostile import CASES, CLEAR, CORRECT, run_cases


def test_cases_cover_every_class_and_get_verdicts():
    assert {group for group, _, _ in CASES} == {"config", "resume", "checkpoint", "data", "offload"}
    rows = run_cases("dim = 12.9") + run_cases("glob characters") + run_cases("MmapStore.create over")
    assert [(r["case"], r["verdict"]) for r in rows] == [
        ("dim = 12.9", CLEAR),
        ("a file name with glob characters", CORRECT),
        ("MmapStore.create over a trained store", CLEAR),
    ]
