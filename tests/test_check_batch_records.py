"""`check --batch` records and tally, in the library: a line that could not be read is a record."""

from __future__ import annotations

import json

from llmkit.errors import EXIT_FLAGGED, InputError
from llmkit.tasks.policy import LLAMA_GUARD_3_1B_CATEGORIES
from llmkit.tasks.safety import CheckTally, Guard, check_jsonl_line
from tests.fake_engine import ScriptedGuardEngine


def _guard(answer: str) -> Guard:
    return Guard(ScriptedGuardEngine(answer=answer), LLAMA_GUARD_3_1B_CATEGORIES)


def test_a_line_that_could_not_be_read_is_its_own_error_record() -> None:
    guard = _guard("safe")
    record = check_jsonl_line(guard, InputError("line 3 is not UTF-8 text"), 3)
    assert record == {"line": 3, "verdict": None, "flagged": None,
                      "error": "line 3 is not UTF-8 text"}
    assert guard.engine.calls == []  # type: ignore[attr-defined]  # the model was not asked


def test_the_tally_counts_and_decides_the_exit_code() -> None:
    safe = check_jsonl_line(_guard("safe"), json.dumps({"prompt": "Bread?"}), 1)
    flagged = check_jsonl_line(_guard("unsafe\nS1"), json.dumps({"prompt": "Harm?"}), 2)
    broken = check_jsonl_line(_guard("safe"), "{not json", 3)
    tally = CheckTally()
    assert tally.exit_code == 0 and tally.summary() == "0 records: 0 safe, 0 flagged, 0 errors"
    tally.add(safe)
    assert tally.exit_code == 0 and tally.summary() == "1 record: 1 safe, 0 flagged, 0 errors"
    tally.add(flagged)
    assert tally.exit_code == EXIT_FLAGGED
    tally.add(broken)
    assert tally.exit_code == 1
    assert tally.summary() == "3 records: 1 safe, 1 flagged, 1 errors"
