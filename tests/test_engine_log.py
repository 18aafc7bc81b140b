"""The log tail that error messages quote: warnings and errors outlive a load's chatter."""

from __future__ import annotations

from llmkit.engines._log import LOG_CONT, LOG_ERROR, LOG_WARN, LogTail

INFO = 2


def test_an_early_error_outlives_hundreds_of_later_lines() -> None:
    log = LogTail(lines=200, important=100)
    log.append(INFO, "loading\n")
    log.append(LOG_ERROR, "llama_init: error: the cause\n")
    log.append(LOG_CONT, "  (more of it)\n")
    log.append(LOG_WARN, "a warning\n")
    for i in range(500):  # one line per layer of a 100-layer model, five times over
        log.append(INFO, f"layer {i}\n")
    lines = log.lines()
    assert lines[:3] == ["llama_init: error: the cause\n", "  (more of it)\n", "a warning\n"]
    assert lines[3:] == [f"layer {i}\n" for i in range(300, 500)]
    assert "loading\n" not in lines


def test_lines_keep_their_order_and_are_not_repeated() -> None:
    log = LogTail(lines=3, important=2)
    for level, text in ((INFO, "a"), (LOG_WARN, "b"), (INFO, "c"), (LOG_ERROR, "d"),
                        (INFO, "e")):
        log.append(level, text)
    assert log.lines() == ["b", "c", "d", "e"]
    for _ in range(3):
        log.append(LOG_ERROR, "x")
    assert log.lines() == ["x", "x", "x"]
    log.clear()
    assert log.lines() == []
