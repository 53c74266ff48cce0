"""What `federimed demo` shows a person while the federation runs: the run's own record."""

from __future__ import annotations

from federimed.research.demo import RoundFollower
from federimed.runrecord import RoundRecord, Scores, append_round


def _record(number: int, dropped: list[str]) -> RoundRecord:
    return RoundRecord(
        round=number,
        participants=["hospital-1", "hospital-2"],
        dropped=dropped,
        train={},
        evaluate={},
        test=Scores(accuracy=0.369, macro_f1=0.272, loss=2.0, num_examples=320),
        traffic={},
        seconds=47.6,
    )


def test_round_follower_prints_each_new_round_once(tmp_path):
    printed: list[str] = []
    follow = RoundFollower(tmp_path, 4, printed.append)
    follow()
    assert printed == []
    append_round(tmp_path, _record(1, []))
    follow()
    assert printed == [
        "round 1/4: test accuracy 36.9% (macro-F1 0.272); 2 hospital(s) took part, "
        "dropped: none; 48 s"
    ]
    append_round(tmp_path, _record(2, ["hospital-3"]))
    follow()
    follow()
    assert len(printed) == 2 and printed[1].endswith("dropped: hospital-3; 48 s")
