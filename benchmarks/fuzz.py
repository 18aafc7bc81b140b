"""Fuzz each target for a longer while: executions and crashes per target, written as JSON.

    .venv/bin/python benchmarks/fuzz.py                      # every target, 10 minutes each
    .venv/bin/python benchmarks/fuzz.py --targets gguf check --minutes 2

Targets run one at a time (each is one process on one core), at ``--nice`` 10 by default so a
shared machine stays usable. A run that finds something starts again on its grown corpus until
its time is up, so one bug does not end the search; each distinct finding is listed with the
command that replays it. The corpus is kept in ``benchmarks/results/fuzz-corpus/TARGET`` and
grows across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS

from tests.fuzz.runner import fuzz
from tests.fuzz.targets import TARGETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for name in args.targets:
        workdir = RESULTS / "fuzz-corpus" / name
        print(f"{name}: fuzzing for {args.minutes:g} min …", flush=True)
        run = fuzz(name, args.minutes * 60, workdir, keep_going=True, nice=args.nice)
        runs.append(run)
        print(f"{name}: {run.executions:,} executions in {run.seconds:.0f} s "
              f"({run.executions / max(run.seconds, 1):.0f}/s), corpus {run.corpus}, "
              f"{len(run.findings)} crashes", flush=True)
        for finding in run.findings:
            print(f"  {finding.kind}: {finding.error}\n"
                  f"    replay: .venv/bin/python -m tests.fuzz {name} {finding.input}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fuzz-{stamp}.json"
    out.write_text(json.dumps({"minutes_per_target": args.minutes,
                               "targets": [run.to_dict() for run in runs]}, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if any(run.findings for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
