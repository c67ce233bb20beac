"""Random bit flips and truncations of every file kind prunekit reads (artifact, compressed artifact,
checkpoint, store manifest, C export budget): each damaged copy is refused in one line or loads equal,
bit for bit, to the intact file; never a traceback, never a silently different result, and no read
changes a file. tests/fixtures/fuzz.py holds the kinds; benchmarks/fuzz_files.py prints the counts."""

from __future__ import annotations

import pytest

from fixtures.fuzz import BAD, KINDS, fuzz, make

SAMPLE = 40  # per kind in the default suite (about a second each); 1,000 in the slow test


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {name: make(name, root) for name in KINDS}


@pytest.mark.parametrize("name", list(KINDS))
def test_damaged_files_are_refused_or_verified(kinds, name):
    counts, bad = fuzz(kinds[name], SAMPLE, seed=1)
    assert sum(counts.values()) == SAMPLE
    assert not any(counts[o] for o in BAD), bad[:5]
    assert counts["refused"] > 0  # the mutations do reach the checks
    assert kinds[name].load() is not None  # the intact file still loads after the run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_a_thousand_mutations_per_kind(kinds, name):
    counts, bad = fuzz(kinds[name], 1000, seed=2)
    assert not any(counts[o] for o in BAD), bad[:5]
