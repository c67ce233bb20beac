"""``verify``: recompute every hash of the store and name each file that does not match.

Checked per entry: the manifest parses, its recorded hash is the hash of its content and the name of its
directory, its parent exists, every listed file exists with the recorded size and SHA-256, and no
unlisted file sits beside them. Checked for the store: the history names only existing entries.
Temp directories of interrupted saves are counted, not reported: readers never see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prunekit.errors import PrunekitError
from prunekit.store import disk
from prunekit.store.manifest import SHORT, Entry, manifest_hash

if TYPE_CHECKING:
    from prunekit.store.store import Store


@dataclass
class VerifyReport:
    """What :meth:`Store.verify` checked and every problem it found (empty: the store is intact)."""

    problems: list[str] = field(default_factory=list)
    entries: int = 0
    files: int = 0
    bytes: int = 0
    leftovers: int = 0  # temp directories of interrupted saves (harmless; removed by the next save)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_entry(store: Store, entry: Entry, report: VerifyReport | None = None) -> list[str]:
    """The problems of one entry (empty: intact); adds its counts to ``report`` if given."""
    where = f"entry '{entry.name}' ({entry.path.name[:SHORT]})"
    rel = entry.path.relative_to(store.path)
    problems = []
    recomputed = manifest_hash(entry.manifest)
    if recomputed != entry.hash:
        problems.append(
            f"{where}: {rel}/manifest.json was changed: its content hashes to {recomputed[:SHORT]}, "
            f"it records {entry.hash[:SHORT]}"
        )
    elif (entry.path / "manifest.json").read_bytes() != disk.json_text(entry.manifest).encode("utf-8"):
        # same content, other bytes: a flip JSON reads back as the same data ("\u00e9" -> "\u00E9")
        problems.append(
            f"{where}: {rel}/manifest.json was changed: its bytes are not the ones the store wrote"
        )
    if entry.path.name != entry.hash:
        problems.append(f"{where}: directory {rel} does not carry the manifest's hash {entry.hash[:SHORT]}")
    files_dir = entry.path / "files"
    present = {p.name for p in files_dir.iterdir()} if files_dir.is_dir() else set()
    for name in sorted(present - set(entry.files)):
        problems.append(f"{where}: {rel}/files/{name} is not in the manifest")
    for name, record in sorted(entry.files.items()):
        path = files_dir / name
        if name not in present:
            problems.append(f"{where}: {rel}/files/{name} is missing")
            continue
        digest, size = disk.sha256_file(path)
        if report is not None:
            report.files += 1
            report.bytes += size
        if size != record.get("bytes"):
            problems.append(
                f"{where}: {rel}/files/{name} has {size} bytes, the manifest records {record.get('bytes')}"
            )
        elif digest != record.get("sha256"):
            problems.append(
                f"{where}: {rel}/files/{name} is corrupted: sha256 {digest[:SHORT]}..., "
                f"the manifest records {str(record.get('sha256'))[:SHORT]}..."
            )
    return problems


def verify_store(store: Store, refs: Sequence[str] | None = None) -> VerifyReport:
    store.require()
    report = VerifyReport()
    entries, broken = store.scan(verify=False)  # check_entry names what is wrong with each manifest
    hashes = {e.hash for e in entries}
    if refs:
        chosen = {store.get(ref).hash for ref in refs}
        entries = [e for e in entries if e.hash in chosen]
    else:
        report.problems.extend(broken)
        for child in sorted(store.entries_dir.iterdir()):
            if not child.is_dir():
                report.problems.append(f"entries/{child.name} is not an entry directory")
    for entry in entries:
        report.entries += 1
        report.problems.extend(check_entry(store, entry, report))
        if entry.parent is not None and entry.parent not in hashes:
            report.problems.append(
                f"entry '{entry.name}' ({entry.short}): its parent {entry.parent[:SHORT]} is not in the store"
            )
    if not refs:
        try:
            events = store.history()
        except PrunekitError as exc:
            report.problems.append(str(exc))
            events = []
        for i, event in enumerate(events):
            if event["hash"] not in hashes:
                report.problems.append(
                    f"history.json event {i} ({event.get('action')} {event.get('name')}) names the entry "
                    f"{str(event['hash'])[:SHORT]}, which is not in the store"
                )
    report.leftovers = len(store.leftovers())
    return report
