"""Run one fuzz target under atheris: ``python -m tests.fuzz TARGET [libFuzzer flags] [corpus…]``.

``python -m tests.fuzz TARGET --write-seeds DIR`` writes the target's seed corpus into DIR and
its libFuzzer dictionary next to it (DIR.dict) instead; ``python -m tests.fuzz TARGET FILE``
replays one input (libFuzzer's own behaviour for a file argument). Run it from the repository
root. tests/fuzz/runner.py drives it for the test suite and benchmarks/fuzz.py.
"""

from __future__ import annotations

import os
import sys

# One BLAS thread: numpy (imported by gguf and the fake guard) otherwise reserves address
# space per core, which the RLIMIT_AS below would count against the code under test.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _write_seeds(name: str, directory: str) -> int:
    from pathlib import Path

    from tests.fuzz.targets import TARGETS

    target = TARGETS[name]()
    try:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for file_name, data in target.seeds().items():
            (out / file_name).write_bytes(data)
        # libFuzzer's dictionary format: one quoted entry a line, bytes as \xNN.
        entries = ['"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}"
                                 for b in entry) + '"' for entry in target.dictionary]
        Path(f"{directory}.dict").write_text("\n".join(entries) + "\n", encoding="ascii")
    finally:
        target.close()
    return 0


def _limit_address_space(megabytes: int) -> None:
    import resource

    limit = megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _import_instrumented(prefixes: tuple[str, ...]) -> None:
    """Import what the target runs while atheris instruments it (coverage for libFuzzer)."""
    import importlib

    import atheris

    with atheris.instrument_imports(include=list(prefixes)):
        for module in ("llmkit.errors", "llmkit.io", "llmkit._fs", "llmkit.gguf_file",
                       "llmkit.images", "llmkit.documents", "llmkit.tasks.safety"):
            importlib.import_module(module)
        if "PIL" in prefixes:
            from PIL import Image

            Image.init()  # Pillow imports its format plugins on first use: do it in here
        if "pypdf" in prefixes:
            importlib.import_module("pypdf")
            importlib.import_module("pypdf.filters")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    name = argv[1]
    from tests.fuzz.targets import TARGETS, Target

    if name not in TARGETS:
        print(f"unknown target {name!r}; the targets are {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if len(argv) == 4 and argv[2] == "--write-seeds":
        return _write_seeds(name, argv[3])

    import atheris

    kind = TARGETS[name]
    _limit_address_space(kind.address_space_mb)
    _import_instrumented(kind.instrument)
    target = kind()
    options: dict[str, object] = {}
    if type(target).mutate is not Target.mutate:
        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            # Half structure-aware (a valid file with one value changed), half libFuzzer's own
            # byte mutations, so both meaningful edits and raw damage are tried.
            if seed % 2:
                mutated = target.mutate(data, max_size, seed)
                if mutated is not None:
                    return mutated
            return bytes(atheris.Mutate(data, max_size))

        options["custom_mutator"] = mutator
    flags = [f"-timeout={kind.timeout}", f"-rss_limit_mb={kind.address_space_mb}"]
    atheris.Setup([argv[0], *flags, *argv[2:]], target, **options)
    try:
        atheris.Fuzz()
    finally:
        target.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
