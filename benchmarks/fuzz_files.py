"""Random bit flips (3 in 4) and truncations (1 in 4) of every file kind prunekit reads, and what the
reader a command uses then does: refused in one line, or a verified load equal to the intact file's, or
one of the failures (a silently different load, a traceback, a multi-line error, a read that changed a
file). Issue 20's target: 1,000 mutations per kind, no failure.

The kinds and the readers are in tests/fixtures/fuzz.py (the test suite runs a small sample of the same).
Format version 1 of the compressed artifact (files written before version 2) is fuzzed too and shown
apart: its header fields beyond the tensors have no hash in that version, which is why version 2 exists.

    python benchmarks/fuzz_files.py               # 1,000 per kind
    python benchmarks/fuzz_files.py --count 200 --kinds artifact,checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.fuzz import BAD, KINDS, LEGACY, OUTCOMES, fuzz, make  # noqa: E402
from prunekit.runtime.cpu import features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join([*KINDS, *LEGACY]))
    parser.add_argument("--show", type=int, default=3, help="Bad cases printed per kind.")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the store's "skipping a damaged entry" warnings, 1,000 times
    print(f"# {features().describe()}")
    print(f"{'kind':<18} " + " ".join(f"{o:>10}" for o in OUTCOMES) + "   seconds")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.kinds.split(","):
            kind = make(name, Path(tmp))
            start = time.perf_counter()
            counts, bad = fuzz(kind, args.count, args.seed)
            seconds = time.perf_counter() - start
            legacy = " (legacy, not a target)" if name in LEGACY else ""
            print(
                f"{name:<18} "
                + " ".join(f"{counts.get(o, 0):>10}" for o in OUTCOMES)
                + f"   {seconds:7.1f}{legacy}"
            )
            for how, outcome, why in bad[: args.show]:
                print(f"    {outcome}: {how}: {why}")
            failed = failed or (name not in LEGACY and any(counts[o] for o in BAD))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
