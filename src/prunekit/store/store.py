"""The artifact store: a directory of immutable entries, each a set of files with a hashed manifest.

Layout (everything is plain files; nothing is ever rewritten in place except by an atomic rename)::

    STORE/store.json                      {"format": "prunekit.store", "format_version": 1}
    STORE/lock                            flock'ed around every change of the store's state
    STORE/entries/<hash>/manifest.json    see prunekit.store.manifest
    STORE/entries/<hash>/files/<name>     the stored copies (read-only)
    STORE/history.json                    every add and rollback, oldest first; the last one is `current`
    STORE/tmp/<id>/, <id>.lock            saves in progress (ignored by readers, removed once stale)

Saving an entry: the files are copied into ``tmp/<id>/`` with their SHA-256 checked, the manifest
written and everything fsynced, all without the store lock (so two writers copy in parallel); then,
under the lock, the name is checked unique and ``tmp/<id>`` is renamed to ``entries/<hash>`` in one step
and the history updated. A writer killed at any point leaves either no entry or a complete one; its
temp directory is recognised as stale (its ``<id>.lock`` is no longer flock'ed: the kernel released it
when the writer died) and removed by the next save.

Rollback never deletes anything: it appends an event that makes an older entry ``current`` again and,
with ``to=DIR``, copies that entry's files out (verified) for deployment.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prunekit import __version__
from prunekit.errors import PrunekitError, did_you_mean
from prunekit.files import atomic_write_json, inside
from prunekit.store import disk
from prunekit.store.diff import diff_entries
from prunekit.store.manifest import (
    CURRENT,
    FORMAT,
    FORMAT_VERSION,
    Entry,
    check_file_name,
    check_name,
    manifest_hash,
    normalize_meta,
    read_manifest,
)
from prunekit.store.run import plan_run
from prunekit.store.verify import VerifyReport, check_entry, verify_store

log = logging.getLogger(__name__)
STORE_FORMAT = "prunekit.store"
_HEX = re.compile(r"[0-9a-f]{4,64}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _versions() -> dict[str, str | None]:
    """This process's library versions, read from the installed metadata (importing torch takes seconds)."""

    try:
        torch_version: str | None = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {"prunekit": __version__, "torch": torch_version, "python": platform.python_version()}


def _file_map(files: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
    """{stored name: source path}; a list keeps each file's own name."""
    if isinstance(files, str | Path):
        files = [files]
    pairs = files.items() if isinstance(files, Mapping) else [(Path(p).name, p) for p in files]
    out: dict[str, Path] = {}
    for name, src in pairs:
        check_file_name(name)
        if name in out:
            raise PrunekitError(f"two files would be stored as '{name}'; pass a dict {{stored name: path}}")
        src = Path(src)
        if not src.is_file():
            raise PrunekitError(f"no such file: {src}")
        out[name] = src
    if not out:
        raise PrunekitError("a store entry needs at least one file")
    return out


def _event(event: Any) -> bool:
    """A history event as the store writes it."""
    return isinstance(event, dict) and all(
        isinstance(event.get(k), str) for k in ("time", "action", "name", "hash")
    )


def _foreign(path: Path) -> bool:
    """Whether a directory holds anything but what a store's first writer creates (another first writer
    may be creating the store right now, so its lock, subdirectories and store.json temp are expected)."""
    ours = {"lock", "entries", "tmp", "store.json"}
    return any(p.name not in ours and not p.name.startswith(".store.json.") for p in path.iterdir())


def enclosing_store(path: str | Path) -> Path | None:
    """The store directory ``path`` lies in (or is), if any: the nearest ancestor holding a store.json."""
    for folder in (Path(path).absolute(), *Path(path).absolute().parents):
        marker = folder / "store.json"
        try:
            if (
                marker.is_file()
                and json.loads(marker.read_text(encoding="utf-8")).get("format") == STORE_FORMAT
            ):
                return folder
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
    return None


def refuse_inside_store(path: str | Path, flag: str = "--out") -> None:
    """One line instead of writing a command's output into an artifact store (whose files are its own)."""
    store = enclosing_store(path)
    if store is not None:
        raise PrunekitError(
            f"{flag} {path} is inside the artifact store {store}: files written there would damage it; "
            "write elsewhere and `prunekit store add` the result"
        )


class Store:
    """An artifact store directory (created by the first :meth:`add`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- layout ---------------------------------------------------------------------------------------
    @property
    def entries_dir(self) -> Path:
        return self.path / "entries"

    @property
    def _tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def _lockfile(self) -> Path:
        return self.path / "lock"

    @property
    def _history(self) -> Path:
        return self.path / "history.json"

    def exists(self) -> bool:
        return (self.path / "store.json").is_file()

    def require(self) -> None:
        """A one-line error unless the directory is a store."""
        if not self.exists():
            raise PrunekitError(
                f"no artifact store at {self.path} (no store.json); create one with "
                f"`prunekit store add RUN_DIR --store {self.path}`"
            )

    def create(self) -> None:
        """Make the directory a store (the first add does it); an existing store is left as it is."""
        if self.exists():
            return
        if self.path.exists() and (not self.path.is_dir() or _foreign(self.path)):
            raise PrunekitError(f"{self.path} exists and is not an artifact store (no store.json)")
        self.path.mkdir(parents=True, exist_ok=True)
        with disk.locked(self._lockfile):
            if not self.exists():  # two first writers: the second finds it done
                for sub in (self.entries_dir, self._tmp):
                    sub.mkdir(exist_ok=True)
                atomic_write_json(
                    self.path / "store.json", {"format": STORE_FORMAT, "format_version": FORMAT_VERSION}
                )

    # -- reading --------------------------------------------------------------------------------------
    def scan(self, verify: bool = True) -> tuple[list[Entry], list[str]]:
        """Every complete entry (oldest first) and the problems of the entries that cannot be read; with
        ``verify`` (readers), an entry whose manifest is not the one stored counts as unreadable."""
        entries, broken = [], []
        for child in sorted(self.entries_dir.iterdir()) if self.entries_dir.is_dir() else []:
            try:
                entries.append(Entry(read_manifest(child / "manifest.json", verify=verify), child))
            except PrunekitError as exc:
                broken.append(str(exc))
        entries.sort(key=lambda e: (e.created, e.name))
        return entries, broken

    def list(self) -> list[Entry]:
        """All entries, oldest first (unreadable ones are skipped with a warning; `verify` names them)."""
        self.require()
        entries, broken = self.scan()
        for problem in broken:
            log.warning("skipping a damaged store entry: %s", problem)
        return entries

    def get(self, ref: str) -> Entry:
        """An entry by name, by hash prefix (at least 4 hex digits), or ``"current"``."""
        entries = self.list()
        if ref == CURRENT:
            current = self.current()
            if current is None:
                raise PrunekitError(f"the store {self.path} has no current entry yet (it is empty)")
            return current
        for entry in entries:
            if entry.name == ref:
                return entry
        if _HEX.fullmatch(ref):
            matches = [e for e in entries if e.hash.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                names = ", ".join(f"{e.short} ({e.name})" for e in matches)
                raise PrunekitError(f"hash prefix '{ref}' matches {len(matches)} entries: {names}; give more")
        choices = [e.name for e in entries]
        hint = did_you_mean(ref, choices) if choices else " (the store is empty)"
        raise PrunekitError(
            f"no entry '{ref}' in the store {self.path}{hint}; use a name or hash prefix from "
            "`prunekit store list`"
        )

    def history(self) -> list[dict[str, Any]]:
        """Every add and rollback, oldest first: {time, action, name, hash, previous}."""
        self.require()
        if not self._history.is_file():
            return []
        try:
            events = json.loads(self._history.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise PrunekitError(
                f"{self._history}: not readable JSON ({exc}); `prunekit store repair` rebuilds it from the "
                "entries"
            ) from None
        if not isinstance(events, list) or not all(_event(e) for e in events):
            raise PrunekitError(
                f"{self._history}: not a list of events (time, action, name, hash); `prunekit store repair` "
                "rebuilds it from the entries"
            )
        return events

    def current(self) -> Entry | None:
        """The entry the last add or rollback made current (None in an empty store)."""
        events = self.history()
        if not events:
            return None
        last = events[-1]["hash"]
        for entry in self.list():
            if entry.hash == last:
                return entry
        raise PrunekitError(
            f"{self._history}: the current entry {last[:12]} is missing; `prunekit store repair` drops "
            "events of missing entries"
        )

    def lineage(self, ref: str) -> list[Entry]:
        """The entry and its ancestors, root first."""
        by_hash = {e.hash: e for e in self.list()}
        chain = [self.get(ref)]
        while chain[-1].parent is not None and chain[-1].parent in by_hash and len(chain) <= len(by_hash):
            chain.append(by_hash[chain[-1].parent])
        return chain[::-1]

    # -- writing --------------------------------------------------------------------------------------
    def add(
        self,
        files: Mapping[str, str | Path] | Sequence[str | Path],
        *,
        name: str,
        parent: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Entry:
        """Store copies of ``files`` as a new entry and make it current; returns it.

        ``files``: paths (stored under their own names) or {stored name: path}. ``parent``: the name or
        hash of the entry this one was made from (None: a root, e.g. the dense original). ``meta``: any of
        recipe, stages, method, layers, recovery, metrics, source, note, versions (see
        :mod:`prunekit.store.manifest`). Adding the same name again with the same files and parent returns
        the existing entry; with different ones it is an error.
        """
        sources = _file_map(files)
        check_name(name)
        meta = normalize_meta(meta)
        parent_hash = self.get(parent).hash if parent is not None else None  # before creating a store
        self.create()
        with self._staging() as tmp:
            (tmp / "files").mkdir()
            records = {}
            for fname, src in sources.items():
                target = tmp / "files" / fname
                digest, size = disk.copy_hashed(src, target)
                os.chmod(target, 0o444)  # stored copies are never edited; verify would catch it anyway
                records[fname] = {"sha256": digest, "bytes": size}
            disk.fsync_dir(tmp / "files")
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "name": name,
                "parent": parent_hash,
                "created": _now(),
                "files": records,
                **meta,
                "versions": meta["versions"] or _versions(),
            }
            manifest["hash"] = manifest_hash(manifest)
            disk.write_json_synced(tmp / "manifest.json", manifest)
            disk.fsync_dir(tmp)
            with disk.locked(self._lockfile):
                for entry in self.scan()[0]:
                    if entry.name != name:
                        continue
                    if entry.files == records and entry.parent == parent_hash:
                        log.info("%s is already stored as %s", name, entry.short)
                        return entry
                    raise PrunekitError(
                        f"the store already has an entry '{name}' ({entry.short}) with other files or "
                        "another parent; store this one under another name"
                    )
                final = self.entries_dir / manifest["hash"]
                os.rename(tmp, final)  # the commit: the entry appears complete or not at all
                disk.fsync_dir(self.entries_dir)
                entry = Entry(manifest, final)
                self._record("add", entry)
        return entry

    def add_run(
        self, run_dir: str | Path, *, name: str | None = None, parent: str | None = None
    ) -> list[Entry]:
        """Store every export of a ``prunekit run`` / ``demo`` output directory, in the recipe's order.

        The first export is a root (or a child of ``parent``, or of the stored entry holding the recipe's
        ``model.artifact`` file); each later export is a child of the one before. Entries are named
        ``<name>/<export>``, ``name`` defaulting to the run directory's name.
        """

        plans = plan_run(Path(run_dir))
        run_name = name if name is not None else Path(run_dir).resolve().name
        self._refuse_renamed_runs(run_name, plans)
        if parent is None:
            parent = self._entry_holding(plans[0].base_artifact)
        added: list[Entry] = []
        for plan in plans:
            entry = self.add(plan.files, name=f"{run_name}/{plan.export}", parent=parent, meta=plan.meta)
            added.append(entry)
            parent = entry.hash
        return added

    def _refuse_renamed_runs(self, run_name: str, plans: list) -> None:
        """Fail before storing anything when one of the run's names is taken by other files (add would
        find it only at that export, after storing the ones before it)."""
        existing = {e.name: e for e in self.list()} if self.exists() else {}
        for plan in plans:
            name = check_name(f"{run_name}/{plan.export}")
            entry = existing.get(name)
            if entry is None:
                continue
            digests = {fname: disk.sha256_file(path)[0] for fname, path in plan.files.items()}
            if digests != {fname: rec["sha256"] for fname, rec in entry.files.items()}:
                raise PrunekitError(
                    f"the store already has an entry '{name}' ({entry.short}) with other files; "
                    "store this run under another name (--name)"
                )

    def _entry_holding(self, path: Path | None) -> str | None:
        """The hash of the newest entry that stores a file with ``path``'s content, if any."""
        if path is None or not path.is_file() or not self.exists():
            return None
        digest, _ = disk.sha256_file(path)
        holders = [e for e in self.list() if any(f["sha256"] == digest for f in e.files.values())]
        return holders[-1].hash if holders else None

    def rollback(self, ref: str | None = None, *, to: str | Path | None = None) -> Entry:
        """Make ``ref`` (default: the current entry's parent) current again; nothing is deleted.

        The entry's files are verified first (a damaged entry is refused). ``to``: also copy its files into
        that directory (each written atomically and checked against the manifest's SHA-256).
        """
        if ref is None:
            current = self.current()
            if current is None or current.parent is None:
                what = "the store is empty" if current is None else f"'{current.name}' is a root"
                raise PrunekitError(f"rollback needs an entry name: {what} (it has no parent)")
            ref = current.parent
        if to is not None:
            self.check_outside(to, "--to")
        entry = self.get(ref)
        problems = check_entry(self, entry)
        if problems:
            raise PrunekitError(f"refusing to roll back to a damaged entry: {problems[0]}")
        if to is not None:  # first: a failed copy leaves the pointer where it was
            self.export(entry.hash, to)
        with disk.locked(self._lockfile):
            current = self.current()
            if current is None or current.hash != entry.hash:
                self._record("rollback", entry)
        return entry

    def export(self, ref: str, to: str | Path) -> list[Path]:
        """Copy an entry's files into the directory ``to`` (created if needed), verified; returns them.
        ``to`` may not lie inside the store (files written there would damage it)."""
        self.check_outside(to, "--to")
        entry = self.get(ref)
        to = Path(to)
        if to.exists() and not to.is_dir():
            raise PrunekitError(f"--to {to} exists and is not a directory")
        to.mkdir(parents=True, exist_ok=True)
        written = []
        for fname, record in sorted(entry.files.items()):
            tmp = to / f".{fname}.{secrets.token_hex(4)}.tmp"
            disk.copy_hashed(entry.file(fname), tmp, expected=record["sha256"])
            os.chmod(tmp, 0o644)
            os.replace(tmp, to / fname)
            written.append(to / fname)
        disk.fsync_dir(to)
        return written

    def check_outside(self, path: str | Path, flag: str) -> None:
        """Refuse a path inside the store for anything but the store's own files."""
        if inside(path, self.path):
            raise PrunekitError(
                f"{flag} {path} is inside the store {self.path}: files written there would damage it; "
                "choose a directory outside the store"
            )

    def repair(self) -> dict[str, Any]:
        """Rebuild ``history.json`` from the entries: keep its readable events that name existing entries,
        add an ``add`` event (at the entry's creation time) for every entry it lacks, in time order. A
        damaged history file is kept beside it as ``history.json.damaged-<time>``. Returns what was done."""
        self.require()
        with disk.locked(self._lockfile):
            entries = self.scan()[0]
            by_hash = {e.hash: e for e in entries}
            try:
                events, damaged = self.history(), False
            except PrunekitError:
                events, damaged = [], self._history.exists()
            kept = [dict(e) for e in events if e["hash"] in by_hash]
            known = {e["hash"] for e in kept}
            added = [
                {"time": e.created, "action": "add", "name": e.name, "hash": e.hash}
                for e in entries
                if e.hash not in known
            ]
            rebuilt = sorted(kept + added, key=lambda e: e["time"])  # stable: kept events keep their order
            previous = None
            for event in rebuilt:
                event["previous"] = previous
                previous = event["hash"]
            report = {
                "kept": len(kept),
                "dropped": len(events) - len(kept),
                "added": len(added),
                "backup": None,
                "current": rebuilt[-1]["hash"] if rebuilt else None,
            }
            if not damaged and rebuilt == events:
                return {**report, "changed": False}
            if damaged:
                backup = self.path / f"history.json.damaged-{_now().replace(':', '')}"
                os.replace(self._history, backup)
                report["backup"] = str(backup)
            atomic_write_json(self._history, rebuilt)
            disk.fsync_dir(self.path)
        log.info("repaired %s: %s", self._history, report)
        return {**report, "changed": True}

    def _record(self, action: str, entry: Entry) -> None:
        """Append a history event (call with the store lock held); its last event names `current`."""
        events = self.history()
        previous = events[-1]["hash"] if events else None
        events.append(
            {"time": _now(), "action": action, "name": entry.name, "hash": entry.hash, "previous": previous}
        )
        atomic_write_json(self._history, events)
        disk.fsync_dir(self.path)  # the rename that replaced history.json, made durable

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh temp directory inside the store, flock'ed as in use; removed unless renamed away."""
        self._tmp.mkdir(exist_ok=True)
        with disk.locked(self._lockfile):  # creation and cleanup never interleave
            self._cleanup_locked()
            ident = f"{os.getpid()}-{secrets.token_hex(6)}"
            fd = disk.hold_lock(self._tmp / f"{ident}.lock")
            tmp = self._tmp / ident
            tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            (self._tmp / f"{ident}.lock").unlink(missing_ok=True)
            os.close(fd)

    def leftovers(self) -> list[Path]:
        """Temp directories whose writer is gone (interrupted saves); readers ignore them."""
        stale = []
        for child in sorted(self._tmp.iterdir()) if self._tmp.is_dir() else []:
            if child.suffix == ".lock":
                continue
            lock = self._tmp / f"{child.name}.lock"
            with disk.locked(lock, blocking=False, create=False) as free:
                if free:
                    stale.append(child)
        return stale

    def cleanup(self) -> int:
        """Remove the temp directories of interrupted saves; returns how many."""
        self.require()
        with disk.locked(self._lockfile):
            return self._cleanup_locked()

    def _cleanup_locked(self) -> int:
        stale = self.leftovers()
        for child in stale:
            shutil.rmtree(child, ignore_errors=True)
            (self._tmp / f"{child.name}.lock").unlink(missing_ok=True)
        for lock in self._tmp.glob("*.lock") if self._tmp.is_dir() else []:
            if not (self._tmp / lock.stem).exists():
                with disk.locked(lock, blocking=False, create=False) as free:
                    if free:
                        lock.unlink(missing_ok=True)
        return len(stale)

    def verify(self, refs: Sequence[str] | None = None) -> VerifyReport:
        """Recompute every hash (of the given entries, or of all); see :mod:`prunekit.store.verify`."""
        return verify_store(self, refs)

    def diff(self, a: str, b: str) -> dict[str, Any]:
        """Metrics and per-layer sparsity of two entries side by side; see :mod:`prunekit.store.diff`."""
        return diff_entries(self.get(a), self.get(b))
