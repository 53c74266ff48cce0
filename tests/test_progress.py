"""What `federimed demo` shows a person while the federation runs."""

from __future__ import annotations

from federimed.demo import LogFollower


def test_log_follower_prints_new_progress_lines_once_and_plainly(tmp_path):
    log = tmp_path / "run-7.log"
    log.write_text(
        "\x1b[92mINFO \x1b[0m:      round 1: test accuracy 0.369, macro-F1 0.272\n"
        "\x1b[92mINFO \x1b[0m:      ControlServicer.ListRuns\n"
    )
    printed: list[str] = []
    follow = LogFollower(tmp_path, printed.append)
    follow()
    assert printed == ["  [run-7] round 1: test accuracy 0.369, macro-F1 0.272"]

    with log.open("a") as handle:
        handle.write("\x1b[91mERROR \x1b[0m:     Traceback (most recent call last)\n")
    follow()
    assert printed[1:] == ["  [run-7] ERROR :     Traceback (most recent call last)"]
    follow()
    assert len(printed) == 2
