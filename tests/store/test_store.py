"""The artifact store: entries round-trip bit-exactly, verify names every file whose bytes changed,
concurrent writers both land intact, a writer killed mid-save leaves no entry, rollback only moves the
current pointer, and a run directory becomes a lineage dense -> pruned with its recipe and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fixtures.cli import call_main
from fixtures.models import mlp
from prunekit.artifact import load_artifact, plain_state_dict, save_artifact
from prunekit.errors import PrunekitError
from prunekit.masking import apply_masks
from prunekit.store import Store
from prunekit.store.disk import json_text
from prunekit.store.manifest import manifest_hash


def tiny_model(seed: int = 0) -> nn.Module:
    return mlp((6, 5, 3), seed)


def write_bytes(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8).numpy().tobytes())  # fmt: skip
    return path


# -- a fake `prunekit run` output directory: real artifacts, metrics.json shaped like the pipeline's ----
STAGES = [
    {"type": "train", "epochs": 2, "lr": 0.05},
    {"type": "evaluate", "label": "dense"},
    {"type": "export", "name": "dense"},
    {
        "type": "prune",
        "pattern": 0.75,
        "criterion": "magnitude",
        "group": "global",
        "schedule": {"type": "iterative", "rate": 0.5},  # rounds 0.5, 0.75: two rounds of fine-tuning
        "finetune": {"epochs": 3, "lr": 0.01},
    },
    {"type": "evaluate", "label": "pruned"},
    {"type": "export", "name": "pruned", "compressed": True},
]


def make_run(directory: Path) -> Path:
    directory.mkdir(parents=True)
    model = tiny_model()
    done = [STAGES[0]]
    save_artifact(directory / "dense.safetensors", model, extra={"recipe": "tiny", "stages": done})
    masks = {"0": torch.rand(5, 6) > 0.75, "2": torch.rand(3, 5) > 0.75}
    apply_masks(model, masks)
    done = [STAGES[0], STAGES[3]]
    save_artifact(directory / "pruned.safetensors", model, extra={"recipe": "tiny", "stages": done})
    write_bytes(directory / "pruned.compressed.safetensors", 300, seed=3)  # the store keeps any file

    def layers(sparsities):
        return [{"layer": n, "type": "Linear", "sparsity": s, "pattern": "x"} for n, s in sparsities.items()]

    recipe = {"name": "tiny", "seed": 0, "model": {"builtin": "mlp"}, "data": {"name": "digits"}}
    metrics = {
        "recipe_name": "tiny",
        "dense": {"accuracy": 0.9, "sparsity": 0.0, "latency_ms": {"p50": 1.0, "p99": 2.0},
                  "per_class_recall": [0.8, 1.0], "support": [3, 4], "layers": layers({"0": 0.0, "2": 0.0}),
                  "recipe": {**recipe, "stages": STAGES[:1]}},
        "pruned": {"accuracy": 0.85, "sparsity": 0.7, "latency_ms": {"p50": 0.5, "p99": 1.5},
                   "per_class_recall": [0.9, 0.7], "support": [3, 4],
                   "layers": layers({"0": 0.7667, "2": 0.8}), "recipe": {**recipe, "stages": done}},
        "rounds": [],
        "recipe": {**recipe, "stages": STAGES},
        "environment": {"torch": "9.9.9-test", "python": "3.x"},
    }  # fmt: skip
    (directory / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return directory


# -- round trip -------------------------------------------------------------------------------------------
def test_add_get_round_trip_is_bit_exact(tmp_path):
    model = tiny_model()
    art = tmp_path / "model.safetensors"
    save_artifact(art, model)
    blob = write_bytes(tmp_path / "notes.bin", 5000, seed=1)
    store = Store(tmp_path / "store")
    meta = {"metrics": {"accuracy": 0.5, "nested": {"x": [1, 2.5]}}, "layers": {"0": 0.25}, "recovery": 4}
    entry = store.add([art, blob], name="mine/v1", meta=meta)

    again = store.get("mine/v1")
    assert again.manifest == entry.manifest
    assert store.get(entry.hash[:6]).hash == entry.hash  # a hash prefix works everywhere
    assert store.get("current").hash == entry.hash
    for src in (art, blob):
        assert again.file(src.name).read_bytes() == src.read_bytes()
    loaded, _ = load_artifact(again.file("model.safetensors"), tiny_model(seed=1))
    for key, value in plain_state_dict(model).items():
        assert torch.equal(plain_state_dict(loaded)[key], value)
    # the manifest is plain JSON, hashed over its content; the layers came back in the list form
    on_disk = json.loads((entry.path / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == entry.manifest and manifest_hash(on_disk) == entry.hash == entry.path.name
    assert on_disk["layers"] == [{"layer": "0", "sparsity": 0.25}]
    assert on_disk["recovery"] == {"epochs": 4, "stages": []}
    assert on_disk["metrics"] == meta["metrics"] and on_disk["parent"] is None
    assert on_disk["files"]["notes.bin"]["bytes"] == 5000
    assert set(on_disk["versions"]) == {"prunekit", "torch", "python"} and on_disk["versions"]["torch"]
    assert store.verify().ok


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metrics=st.dictionaries(st.text(min_size=1, max_size=8), st.floats(allow_nan=False) | st.integers()))
def test_any_json_metrics_round_trip(tmp_path_factory, metrics):
    base = tmp_path_factory.mktemp("rt")
    store = Store(base / "store")
    entry = store.add([write_bytes(base / "f.bin", 10, 0)], name="m", meta={"metrics": metrics})
    assert Store(store.path).get("m").manifest["metrics"] == metrics == entry.manifest["metrics"]
    assert store.verify().ok


# -- verify ---------------------------------------------------------------------------------------------
@pytest.fixture
def stored(tmp_path):
    store = Store(tmp_path / "store")
    art = tmp_path / "model.safetensors"
    save_artifact(art, tiny_model())
    entry = store.add([art], name="run/dense")
    return store, entry


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_names_the_file_with_any_flipped_byte(stored, data):
    store, entry = stored
    path = entry.file("model.safetensors")
    size = path.stat().st_size
    where, bit = data.draw(st.integers(0, size - 1)), data.draw(st.integers(0, 7))
    original = path.read_bytes()
    os.chmod(path, 0o644)
    try:
        flipped = bytearray(original)
        flipped[where] ^= 1 << bit
        path.write_bytes(bytes(flipped))
        report = store.verify()
        assert len(report.problems) == 1
        assert "files/model.safetensors is corrupted" in report.problems[0]
        assert entry.hash[:12] in report.problems[0] and "run/dense" in report.problems[0]
    finally:
        path.write_bytes(original)
    assert store.verify().ok


def test_verify_catches_every_flipped_bit_of_a_manifest(tmp_path):
    # two bits of every byte (all eight take ~30 s): bit 5 is ASCII's case bit, whose flips JSON can read
    # back as the same data ("\u00e9" -> "\u00E9"), which a hash of the parsed content alone does not see
    store = Store(tmp_path / "store")
    art = tmp_path / "model.safetensors"
    save_artifact(art, tiny_model())
    entry = store.add([art], name="run/dense", meta={"metrics": {"lr": 1e-05}, "note": "café"})
    manifest = entry.path / "manifest.json"
    original = manifest.read_bytes()
    assert b"\\u00e9" in original and b"1e-05" in original
    os.chmod(manifest, 0o644)
    missed = []
    for where in range(len(original)):
        for bit in (0, 5):
            flipped = bytearray(original)
            flipped[where] ^= 1 << bit
            manifest.write_bytes(bytes(flipped))
            if store.verify().ok:
                missed.append((where, bit, bytes(flipped[where - 5 : where + 5])))
    manifest.write_bytes(original)
    assert missed == []
    assert store.verify().ok


def test_verify_catches_edited_manifest_missing_and_extra_files(stored, tmp_path):
    store, entry = stored
    manifest = entry.path / "manifest.json"
    data = json.loads(manifest.read_text())
    data["metrics"] = {"accuracy": 0.99}  # valid JSON, but not what was stored
    manifest.write_text(json.dumps(data))
    (entry.path / "files" / "extra.bin").write_bytes(b"x")
    os.chmod(entry.file("model.safetensors"), 0o644)
    entry.file("model.safetensors").unlink()
    problems = store.verify().problems
    assert any("manifest.json was changed" in p for p in problems)
    assert any("files/extra.bin is not in the manifest" in p for p in problems)
    assert any("files/model.safetensors is missing" in p for p in problems)
    manifest.write_text("{not json")
    problems = store.verify().problems
    assert any(str(manifest) in p and "not a readable manifest" in p for p in problems)


# -- concurrency and crashes (real processes) --------------------------------------------------------
# The child slows its own copy down through the module's chunk reader (the test hook lives here, not in
# the library): after the first chunk it touches MARK and, if given, waits until WAIT exists.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from prunekit.errors import PrunekitError
    from prunekit.store import Store, disk
    store, name, src, mark, wait, hook = sys.argv[1:7]
    disk.CHUNK = 64 * 1024  # larger than the write buffer: the first chunk reaches the file itself
    real_chunks, real_rename = disk._read_chunks, disk.os.rename

    def pause():
        Path(mark).touch()
        deadline = time.monotonic() + 60
        while wait == "forever" or not Path(wait).exists():
            if time.monotonic() > deadline:
                sys.exit(f"{wait} never appeared")
            time.sleep(0.01)

    def chunks(handle):
        for i, chunk in enumerate(real_chunks(handle)):
            yield chunk
            if hook == "copy" and i == 0 and not Path(mark).exists():
                pause()

    def rename(a, b):
        if hook == "commit":
            pause()  # holding the store lock
        real_rename(a, b)

    disk._read_chunks, disk.os.rename = chunks, rename
    try:
        Store(store).add([src], name=name)
    except PrunekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    """
)


def spawn(store: Path, name: str, src: Path, mark: Path, wait: str, hook: str = "copy") -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(store), name, str(src), str(mark), wait, hook]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_two_processes_saving_at_once_both_land_intact(tmp_path):
    store = Store(tmp_path / "store")
    srcs = [write_bytes(tmp_path / f"w{i}.bin", 256 * 1024, seed=i) for i in range(2)]
    marks = [tmp_path / "a-mid", tmp_path / "b-mid"]
    # each writer stops mid-copy until the other is mid-copy too: both saves provably overlap
    procs = [spawn(store.path, f"w/{i}", srcs[i], marks[i], str(marks[1 - i])) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    entries = {e.name: e for e in store.list()}
    assert set(entries) == {"w/0", "w/1"}
    for i in range(2):
        assert entries[f"w/{i}"].file(f"w{i}.bin").read_bytes() == srcs[i].read_bytes()
    report = store.verify()
    assert report.ok and report.entries == 2 and report.leftovers == 0, report
    assert sorted(e["name"] for e in store.history()) == ["w/0", "w/1"]
    assert not list((store.path / "tmp").iterdir())


def test_two_processes_claiming_one_name_exactly_one_wins(tmp_path):
    store = Store(tmp_path / "store")
    srcs = [write_bytes(tmp_path / f"w{i}.bin", 128 * 1024, seed=10 + i) for i in range(2)]
    marks = [tmp_path / "a-mid", tmp_path / "b-mid"]
    procs = [spawn(store.path, "same", srcs[i], marks[i], str(marks[1 - i])) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert "already has an entry 'same'" in loser
    (entry,) = store.list()
    winner = [p.returncode for p in procs].index(0)
    assert entry.file(f"w{winner}.bin").read_bytes() == srcs[winner].read_bytes()
    assert store.verify().ok


@pytest.mark.parametrize("hook", ["copy", "commit"])
def test_killed_save_leaves_no_half_entry(tmp_path, hook):
    store = Store(tmp_path / "store")
    first = store.add([write_bytes(tmp_path / "a.bin", 100, seed=0)], name="a")
    src = write_bytes(tmp_path / "big.bin", 256 * 1024, seed=1)
    mark = tmp_path / "mid"
    proc = spawn(store.path, "b", src, mark, "forever", hook)
    wait_for(mark, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (tmp_dir,) = [p for p in (store.path / "tmp").iterdir() if p.is_dir()]
    partial = tmp_dir / "files" / "big.bin"
    if hook == "copy":  # killed mid-file: the partial copy is there, unseen
        assert 0 < partial.stat().st_size < src.stat().st_size
    else:  # killed holding the store lock, complete temp entry not yet renamed in
        assert (tmp_dir / "manifest.json").is_file()
    assert [e.name for e in store.list()] == ["a"]
    assert store.current().hash == first.hash
    report = store.verify()
    assert report.ok and report.leftovers == 1, report
    # the next save is not blocked (the kernel dropped the dead writer's locks) and cleans up after it
    store.add([src], name="b")
    assert [e.name for e in store.list()] == ["a", "b"]
    assert not list((store.path / "tmp").iterdir())
    assert store.verify().ok


# -- rollback, names, errors ------------------------------------------------------------------------
def test_rollback_moves_current_keeps_entries_and_exports_verified_copies(tmp_path):
    store = Store(tmp_path / "store")
    v1 = store.add([write_bytes(tmp_path / "m.bin", 2000, seed=1)], name="m/v1")
    v2 = store.add({"m.bin": write_bytes(tmp_path / "m2.bin", 2000, seed=2)}, name="m/v2", parent="m/v1")
    assert store.current().hash == v2.hash and v2.parent == v1.hash
    assert [e.hash for e in store.lineage("m/v2")] == [v1.hash, v2.hash]
    assert store.rollback().hash == v1.hash  # default: the current entry's parent
    assert store.current().hash == v1.hash
    assert [e.name for e in store.list()] == ["m/v1", "m/v2"]  # nothing deleted
    last = store.history()[-1]
    assert (last["action"], last["hash"], last["previous"]) == ("rollback", v1.hash, v2.hash)
    deploy = tmp_path / "deploy"
    (deploy).mkdir()
    (deploy / "m.bin").write_bytes(b"old deployment")
    store.rollback("m/v2", to=deploy)
    assert (deploy / "m.bin").read_bytes() == (tmp_path / "m2.bin").read_bytes()
    assert [p.name for p in deploy.iterdir()] == ["m.bin"]  # no temp files left beside it
    events = len(store.history())
    store.rollback("m/v2")  # already current: no event
    assert len(store.history()) == events
    os.chmod(v1.file("m.bin"), 0o644)
    v1.file("m.bin").write_bytes(b"damaged")
    with pytest.raises(PrunekitError, match="refusing to roll back to a damaged entry.*m.bin"):
        store.rollback("m/v1")
    assert store.current().hash == v2.hash


def test_names_and_user_errors(tmp_path):
    store = Store(tmp_path / "store")
    src = write_bytes(tmp_path / "f.bin", 10, seed=0)
    with pytest.raises(PrunekitError, match="no artifact store at"):
        store.list()
    entry = store.add([src], name="edge/pruned")
    assert store.add([src], name="edge/pruned").hash == entry.hash  # same files and parent: no new entry
    with pytest.raises(PrunekitError, match="already has an entry 'edge/pruned'"):
        store.add([write_bytes(tmp_path / "g.bin", 10, seed=1)], name="edge/pruned")
    with pytest.raises(PrunekitError, match="did you mean 'edge/pruned'"):
        store.get("edge/prunde")
    with pytest.raises(PrunekitError, match="store entry name"):
        store.add([src], name="../escape")
    with pytest.raises(PrunekitError, match="store entry name"):
        store.add([src], name="current")
    with pytest.raises(PrunekitError, match="unknown store meta key 'metric' \\(did you mean 'metrics'"):
        store.add([src], name="x", meta={"metric": {}})
    with pytest.raises(PrunekitError, match="'layers' must be"):
        store.add([src], name="x", meta={"layers": {"fc": 1.5}})
    with pytest.raises(PrunekitError, match="no such file"):
        store.add([tmp_path / "nope.bin"], name="x")
    with pytest.raises(PrunekitError, match="no entry 'nope'"):
        store.add([src], name="x", parent="nope")
    other = tmp_path / "not-a-store"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PrunekitError, match="is not an artifact store"):
        Store(other).add([src], name="x")
    assert [e.name for e in store.list()] == ["edge/pruned"] and store.verify().ok


def test_hash_prefixes_resolve_and_an_ambiguous_one_is_an_error(tmp_path):
    store = Store(tmp_path / "store")
    real = store.add([write_bytes(tmp_path / "f.bin", 10, 0)], name="real")
    # two intact entries whose hashes share their first 4 hex digits (a note varied until they do: about
    # 65,536 hashes of a small manifest, ~1 s)
    made = []
    for name in ("x1", "x2"):
        for tries in range(1_000_000):
            manifest = {**real.manifest, "name": name, "note": f"try {tries}"}
            manifest["hash"] = manifest_hash(manifest)
            if not made or manifest["hash"][:4] == made[0]["hash"][:4]:
                break
        made.append(manifest)
        folder = store.path / "entries" / manifest["hash"]
        (folder / "files").mkdir(parents=True)
        (folder / "files" / "f.bin").write_bytes(real.file("f.bin").read_bytes())
        (folder / "manifest.json").write_text(json_text(manifest), encoding="utf-8")
    a, b = (m["hash"] for m in made)
    prefix, differ = a[:4], next(i for i in range(64) if a[i] != b[i])
    with pytest.raises(PrunekitError, match=f"hash prefix '{prefix}' matches 2 entries"):
        store.get(prefix)
    assert store.get(b[: max(differ + 1, 4)]).name == "x2" and store.get(real.hash[:4]).name == "real"
    with pytest.raises(PrunekitError, match="no entry 'abc'"):  # under 4 digits: a name, not a prefix
        store.get("abc")
    assert store.verify().ok


def test_a_changed_manifest_is_never_read_as_an_entry(tmp_path):
    """Readers (list, get, show) check each manifest's hash: an edited one is skipped with a warning and
    named by verify, never shown with its changed numbers."""
    store = Store(tmp_path / "store")
    entry = store.add([write_bytes(tmp_path / "f.bin", 10, 0)], name="m", meta={"metrics": {"accuracy": 0.9}})
    manifest = entry.path / "manifest.json"
    os.chmod(manifest, 0o644)
    manifest.write_bytes(manifest.read_bytes().replace(b"0.9", b"0.3"))
    assert store.list() == []
    with pytest.raises(PrunekitError, match="no entry 'm'"):
        store.get("m")
    assert any("manifest.json was changed" in p for p in store.verify().problems)


# -- a run directory --------------------------------------------------------------------------------
def test_add_run_records_lineage_recipe_and_metrics(tmp_path):
    run = make_run(tmp_path / "tiny-run")
    store = Store(tmp_path / "store")
    dense, pruned = store.add_run(run)
    assert (dense.name, pruned.name) == ("tiny-run/dense", "tiny-run/pruned")
    assert dense.parent is None and pruned.parent == dense.hash
    assert set(pruned.files) == {"pruned.safetensors", "pruned.compressed.safetensors"}
    for name in pruned.files:
        assert pruned.file(name).read_bytes() == (run / name).read_bytes()
    sizes = {name: (run / name).stat().st_size for name in pruned.files}
    assert pruned.size_bytes == sum(sizes.values())  # both copies of the model
    assert pruned.model_bytes == min(sizes.values())  # the model once, in its smallest file
    assert dense.model_bytes == dense.size_bytes == (run / "dense.safetensors").stat().st_size
    m = pruned.manifest
    metrics = json.loads((run / "metrics.json").read_text())
    assert m["layers"] == metrics["pruned"]["layers"] and m["metrics"]["accuracy"] == 0.85
    assert "layers" not in m["metrics"] and "recipe" not in m["metrics"]
    assert m["stages"] == [STAGES[0], STAGES[3]] and dense.manifest["stages"] == [STAGES[0]]
    assert [s["criterion"] for s in m["method"]] == ["magnitude"] and dense.manifest["method"] == []
    assert m["recovery"]["epochs"] == 2 * 3 and dense.manifest["recovery"]["epochs"] == 0
    assert m["recipe"]["stages"] == STAGES and m["recipe"]["name"] == "tiny"
    assert m["versions"]["torch"] == "9.9.9-test" and m["versions"]["prunekit"]
    assert m["source"]["export"] == "pruned" and m["source"]["metrics_label"] == "pruned"
    assert store.current().hash == pruned.hash
    assert [e.hash for e in store.add_run(run)] == [dense.hash, pruned.hash]  # again: nothing new
    assert len(store.history()) == 2
    # a second run starting from the stored pruned artifact continues its lineage
    run2 = make_run(tmp_path / "run2")
    data = json.loads((run2 / "metrics.json").read_text())
    data["recipe"]["model"] = {"artifact": str(pruned.file("pruned.safetensors"))}
    (run2 / "metrics.json").write_text(json.dumps(data))
    assert store.add_run(run2)[0].parent == pruned.hash

    d = store.diff("tiny-run/dense", "tiny-run/pruned")
    rows = {r["key"]: r for r in d["metrics"]}
    assert rows["accuracy"]["delta"] == pytest.approx(0.85 - 0.9)
    assert rows["per_class_recall.1"]["b"] == 0.7 and "support.0" not in rows
    assert rows["recovery_epochs"]["delta"] == 6
    assert [(r["layer"], r["a"], r["b"]) for r in d["layers"]] == [("0", 0.0, 0.7667), ("2", 0.0, 0.8)]


def test_add_run_errors(tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(PrunekitError, match="has no metrics.json"):
        store.add_run(tmp_path)
    run = make_run(tmp_path / "r")
    (run / "pruned.compressed.safetensors").unlink()
    with pytest.raises(
        PrunekitError, match="exports 'pruned' but .*pruned.compressed.safetensors is missing"
    ):
        store.add_run(run)
    assert not store.exists() or store.list() == []
    (run / "pruned.compressed.safetensors").write_bytes(b"restored")
    store.add([write_bytes(tmp_path / "x.bin", 10, 0)], name="r/pruned")  # taken by other files
    with pytest.raises(PrunekitError, match="already has an entry 'r/pruned'.*another name \\(--name\\)"):
        store.add_run(run)
    assert [e.name for e in store.list()] == ["r/pruned"]  # refused up front: r/dense was not stored either
    assert [e.name for e in store.add_run(run, name="r2")] == ["r2/dense", "r2/pruned"]


# -- the command line -------------------------------------------------------------------------------
def test_cli_session(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "tiny-run")
    s = str(tmp_path / "store")

    def cli(*args):
        return call_main(monkeypatch, capsys, "store", *args, "--store", s)

    code, out, _ = cli("add", str(run))
    assert code == 0 and "stored tiny-run/dense" in out and "child of tiny-run/dense" in out
    code, out, _ = cli("list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and lines[2].startswith("* ") and "tiny-run/pruned" in lines[2]
    code, out, _ = cli("show", "tiny-run/pruned")
    assert code == 0 and "lineage    tiny-run/dense" in out and "recovery   6 epochs" in out
    assert "magnitude (global), iterative rate 0.5" in out and "0.8000" in out
    code, out, _ = cli("show", "current", "--json")
    assert json.loads(out)["name"] == "tiny-run/pruned"
    code, out, _ = cli("diff", "tiny-run/dense", "tiny-run/pruned")
    assert code == 0 and "B descends from A" in out
    assert any(line.split()[:4] == ["accuracy", "0.9000", "0.8500", "-0.0500"] for line in out.splitlines())
    code, out, _ = cli("rollback", "--to", str(tmp_path / "deploy"))
    assert code == 0 and "current: tiny-run/dense" in out
    assert (tmp_path / "deploy" / "dense.safetensors").read_bytes() == (
        run / "dense.safetensors"
    ).read_bytes()
    code, out, _ = cli("history")
    assert [line.split()[2] for line in out.splitlines()] == ["add", "add", "rollback"]
    code, out, _ = cli("verify")
    assert code == 0 and out.startswith("ok: 2 entries, 3 files")

    stored = next(Path(s, "entries").glob("*/files/dense.safetensors"))
    os.chmod(stored, 0o644)
    raw = bytearray(stored.read_bytes())
    raw[100] ^= 0xFF
    stored.write_bytes(bytes(raw))
    code, _, err = cli("verify")
    assert code == 1 and "files/dense.safetensors is corrupted" in err and "tiny-run/dense" in err
    code, out, _ = cli("verify", "tiny-run/pruned")  # only the entries named
    assert code == 0 and out.startswith("ok: 1 entries, 2 files")
    code, _, err = cli("show", "tiny-run/prunde")
    assert code == 2 and err.count("\n") == 1 and "did you mean 'tiny-run/pruned'" in err
    code, _, err = cli("add", str(run / "dense.safetensors"))
    assert code == 2 and "--name is needed" in err
    code, _, err = cli("add", str(run / "nope.safetensors"), "--name", "x")
    assert code == 2 and err.count("\n") == 1 and "nope.safetensors: no such file or directory" in err
    code, _, err = cli("add", str(tmp_path / "no-run"))  # a mistyped run directory: not "--name is needed"
    assert code == 2 and err.count("\n") == 1 and "no-run: no such file or directory" in err


TINY_RECIPE = """\
name: tiny
seed: 0
model: {builtin: resnet-digits, args: {widths: [8, 16], blocks: 1}}
data: {name: digits, batch_size: 128}
stages:
  - {type: train, epochs: 1, lr: 0.05}
  - {type: evaluate, label: dense, latency_runs: 5, latency_warmup: 1}
  - {type: export, name: dense}
  - {type: prune, pattern: 0.6, criterion: magnitude, group: global, finetune: {epochs: 1, lr: 0.01}}
  - {type: evaluate, label: pruned, latency_runs: 5, latency_warmup: 1}
  - {type: export, name: pruned, compressed: true}
"""


def test_run_with_a_bad_store_fails_before_running(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE, encoding="utf-8")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    code, _, err = call_main(
        monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--store", str(foreign)
    )
    assert code == 2 and "is not an artifact store" in err and not out.exists()


@pytest.mark.slow
def test_run_store_option_stores_the_real_exports(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE, encoding="utf-8")
    out, store = tmp_path / "out", Store(tmp_path / "store")
    code, stdout, err = call_main(
        monkeypatch, capsys, "run", str(recipe), "--out", str(out), "-q", "--store", str(store.path)
    )
    assert code == 0, err
    assert "stored out/dense" in stdout and "stored out/pruned" in stdout
    dense, pruned = store.list()
    metrics = json.loads((out / "metrics.json").read_text())
    assert pruned.parent == dense.hash and pruned.manifest["recipe"]["name"] == "tiny"
    assert pruned.manifest["metrics"]["accuracy"] == metrics["pruned"]["accuracy"]
    assert pruned.manifest["layers"] == metrics["pruned"]["layers"]
    assert pruned.manifest["recovery"]["epochs"] == 1  # one-shot: one round of one epoch
    assert set(pruned.files) == {"pruned.safetensors", "pruned.compressed.safetensors"}
    for name in pruned.files:
        assert pruned.file(name).read_bytes() == (out / name).read_bytes()
    assert store.verify().ok
