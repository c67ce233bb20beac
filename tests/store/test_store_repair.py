"""Nothing lost from the store: ``--to`` inside the store is refused (it used to write files into it and
corrupt it), and ``prunekit store repair`` rebuilds a damaged history.json from the entries, keeping the
damaged file beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.cli import call_main
from prunekit.errors import PrunekitError
from prunekit.store import Store


def _store(tmp_path: Path) -> tuple[Store, list]:
    store = Store(tmp_path / "store")
    entries = []
    for i, name in enumerate(("run/dense", "run/pruned", "run/int8")):
        src = tmp_path / f"f{i}.bin"
        src.write_bytes(bytes([i]) * (100 + i))
        entries.append(store.add([src], name=name, parent=entries[-1].hash if entries else None))
    return store, entries


def _snapshot(store: Store) -> dict[str, bytes]:
    root = store.path
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("inside", ["", "entries", "entries/HASH/files", "tmp/x"])
def test_rollback_and_export_to_inside_the_store_are_refused(tmp_path, inside):
    store, entries = _store(tmp_path)
    target = store.path / inside.replace("HASH", entries[0].hash)
    before = _snapshot(store)
    with pytest.raises(PrunekitError, match="is inside the store"):
        store.rollback("run/dense", to=target)
    with pytest.raises(PrunekitError, match="is inside the store"):
        store.export("run/dense", target)
    assert _snapshot(store) == before and store.verify().ok
    assert store.current().name == "run/int8"  # the refused rollback did not move the pointer either


def test_the_cli_refuses_rollback_to_inside_the_store(tmp_path, monkeypatch, capsys):
    store, _ = _store(tmp_path)
    code, _, err = call_main(
        monkeypatch,
        capsys,
        "store",
        "rollback",
        "run/dense",
        "--store",
        str(store.path),
        "--to",
        str(store.path),
    )
    assert code == 2 and err.strip().startswith("error: --to") and len(err.strip().splitlines()) == 1
    assert store.verify().ok


def test_repair_rebuilds_an_unreadable_history(tmp_path, monkeypatch, capsys):
    store, entries = _store(tmp_path)
    history = store.path / "history.json"
    history.write_text('[{"time": "2026-01-01T00:00:00Z", "act')  # torn
    with pytest.raises(PrunekitError, match="prunekit store repair"):
        store.current()
    assert not store.verify().ok
    code, out, err = call_main(monkeypatch, capsys, "store", "repair", "--store", str(store.path))
    assert code == 0, err
    assert "history.json was damaged: kept it as" in out and "3 added" in out
    backups = list(store.path.glob("history.json.damaged-*"))
    assert len(backups) == 1 and backups[0].read_text().startswith('[{"time"')  # nothing thrown away
    assert store.current().hash == entries[-1].hash  # the newest entry is current again
    assert [e["hash"] for e in store.history()] == [e.hash for e in entries]
    assert store.verify().ok
    code, out, _ = call_main(monkeypatch, capsys, "store", "repair", "--store", str(store.path))
    assert code == 0 and "nothing to repair" in out


def test_repair_keeps_rollbacks_and_drops_events_of_missing_entries(tmp_path):
    store, entries = _store(tmp_path)
    store.rollback("run/pruned")
    events = store.history()
    ghost = {**events[0], "hash": "f" * 64, "name": "gone", "time": events[-1]["time"]}
    history = store.path / "history.json"
    os.chmod(history, 0o644)
    history.write_text(json.dumps([*events, ghost]))
    assert not store.verify().ok  # the event names an entry that is not in the store
    report = store.repair()
    assert report["changed"] and report["dropped"] == 1 and report["added"] == 0 and report["backup"] is None
    assert [e["action"] for e in store.history()] == ["add", "add", "add", "rollback"]
    assert store.current().name == "run/pruned" and store.verify().ok


def test_repair_adds_entries_the_history_lacks(tmp_path):
    store, entries = _store(tmp_path)
    history = store.path / "history.json"
    history.write_text(json.dumps(store.history()[:1]))
    report = store.repair()
    assert report["added"] == 2 and report["kept"] == 1
    assert [e["name"] for e in store.history()] == ["run/dense", "run/pruned", "run/int8"]
    assert [e["previous"] for e in store.history()] == [None, entries[0].hash, entries[1].hash]


def test_commands_do_not_write_into_a_store(tmp_path, monkeypatch, capsys):
    """Outputs of run, compress, export ... inside an artifact store would damage it: one line instead."""
    import torch
    import yaml

    from fixtures.recipes import TINY
    from prunekit.artifact import save_artifact
    from prunekit.jobs import recipe
    from prunekit.jobs.run import run_recipe

    store, _ = _store(tmp_path)
    before = _snapshot(store)
    inside = store.path / "entries" / "out"
    with pytest.raises(PrunekitError, match="is inside the artifact store"):
        run_recipe(recipe.from_dict(TINY), inside, progress=False)
    source = tmp_path / "a.safetensors"
    save_artifact(source, torch.nn.Linear(3, 2))
    for args in (
        ["compress", str(source), "--out", str(store.path / "c.safetensors")],
        ["export", "onnx", str(source), "--out", str(store.path / "tmp" / "m.onnx"), "--input-shape", "1,3"],
    ):
        code, _, err = call_main(monkeypatch, capsys, *args)
        assert code == 2 and "is inside the artifact store" in err, err
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY))
    code, _, err = call_main(monkeypatch, capsys, "run", str(recipe_file), "--out", str(store.path / "x"))
    assert code == 2 and "is inside the artifact store" in err
    assert _snapshot(store) == before and store.verify().ok
