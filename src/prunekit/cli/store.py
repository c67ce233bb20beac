"""`prunekit store ...`: the artifact store (dense original and compressed versions with their lineage).

The store directory comes from ``--store`` (or the environment variable ``PRUNEKIT_STORE``; default
``./prunekit-store``). Names: an entry's name (``<run>/<export>``), a hash prefix of at least 4 hex
digits, or ``current``. ``verify`` exits 1 when anything does not match (each problem named on stderr),
and every command exits 2 with one ``error:`` line on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from prunekit.errors import PrunekitError

if TYPE_CHECKING:
    from prunekit.store import Entry, Store

store_app = typer.Typer(
    help="Versioned artifacts with lineage: add, list, show, diff, rollback, history, verify, repair.",
    no_args_is_help=True,
)

_STORE = typer.Option(Path("prunekit-store"), "--store", envvar="PRUNEKIT_STORE", help="The store directory.")
_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _open(path: Path) -> Store:
    from prunekit.store import Store

    return Store(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def _signed(value: Any) -> str:
    if value is None:
        return ""
    return ("+" if value > 0 else "") + _fmt(value)


def _label(entry: Entry) -> str:
    return f"{entry.name} ({entry.short})"


def _method(stage: dict[str, Any]) -> str:
    kind = stage.get("type")
    if kind == "prune":
        schedule = stage.get("schedule") or {}
        rate = f" rate {schedule['rate']}" if schedule.get("rate") is not None else ""
        group = f" ({stage['group']})" if stage.get("group") else ""
        return (
            f"prune {stage.get('pattern')} {stage.get('criterion', 'magnitude')}{group}, "
            f"{schedule.get('type', 'one-shot')}{rate}"
        )
    if kind == "structured":
        return f"structured ratio {stage.get('ratio')} {stage.get('importance', 'l2')}"
    if kind == "quantize":
        return f"quantize int8 ({stage.get('activations', 'static')} activations)"
    return str(kind)


@store_app.command("add")
def add(
    sources: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR | FILE...", help="A `prunekit run`/`demo` output directory, or files."
    ),
    store: Path = _STORE,
    name: str = typer.Option(
        None, "--name", help="Run directory: the name prefix (default its name). Files: the entry's name."
    ),
    parent: str = typer.Option(None, "--parent", help="The entry this was made from (name or hash)."),
    note: str = typer.Option(None, "--note", help="Files only: a free-text note kept in the manifest."),
) -> None:
    """Store a run's exports (dense first, each later one the child of the one before) or some files."""
    missing = [str(p) for p in sources if not p.exists()]
    if missing:  # before guessing files vs run directory (a mistyped run dir is not "--name is needed")
        raise PrunekitError(f"{', '.join(missing)}: no such file or directory")
    s = _open(store)
    before = {e.hash for e in s.list()} if s.exists() else set()
    if len(sources) == 1 and sources[0].is_dir():
        if note is not None:
            raise PrunekitError("--note is for files; a run directory's entries carry its metrics instead")
        entries = s.add_run(sources[0], name=name, parent=parent)
    else:
        if name is None:
            raise PrunekitError("--name is needed when storing files, e.g. --name mymodel/v2")
        entries = [s.add(sources, name=name, parent=parent, meta={"note": note})]
    by_hash = {e.hash: e for e in s.list()}
    for entry in entries:
        verb = "stored" if entry.hash not in before else "already stored"
        origin = f"child of {_label(by_hash[entry.parent])}" if entry.parent in by_hash else "root"
        typer.echo(f"{verb} {_label(entry)}: {len(entry.files)} files, {entry.size_bytes:,} bytes, {origin}")
    typer.echo(f"current: {_label(s.current())}")


@store_app.command("list")
def list_(store: Path = _STORE, as_json: bool = _JSON) -> None:
    """All entries, oldest first; `*` marks the current one."""
    s = _open(store)
    entries, current = s.list(), s.current()
    if as_json:
        rows = [{**e.manifest, "current": current is not None and e.hash == current.hash} for e in entries]
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max([len(e.name) for e in entries] + [4])
    typer.echo(
        f"  {'hash':<12}  {'name':<{width}}  {'parent':<12}  {'created (UTC)':<19}  "
        f"{'sparsity':>8}  {'accuracy':>8}  {'model KiB':>9}  {'files KiB':>9}"
    )
    for e in entries:
        mark = "*" if current is not None and e.hash == current.hash else " "
        m = e.manifest.get("metrics") or {}
        typer.echo(
            f"{mark} {e.short:<12}  {e.name:<{width}}  {(e.parent or '-')[:12]:<12}  "
            f"{e.created[:19].replace('T', ' '):<19}  {_fmt(m.get('sparsity')):>8}  "
            f"{_fmt(m.get('accuracy')):>8}  {e.model_bytes / 1024:>9.1f}  {e.size_bytes / 1024:>9.1f}"
        )
    if not entries:
        typer.echo(f"(no entries in {store})")


@store_app.command("show")
def show(
    name: str = typer.Argument(..., help="Name, hash prefix or 'current'."),
    store: Path = _STORE,
    as_json: bool = _JSON,
) -> None:
    """One entry's manifest: lineage, recipe, method, recovery epochs, metrics, files, per-layer sparsity."""
    s = _open(store)
    e = s.get(name)
    if as_json:
        typer.echo(json.dumps(e.manifest, indent=2))
        return
    m = e.manifest
    current = s.current()
    typer.echo(f"{e.name}  {e.hash}" + ("  (current)" if current and current.hash == e.hash else ""))
    typer.echo(f"lineage    {' -> '.join(_label(x) for x in s.lineage(e.hash))}")
    typer.echo(f"created    {e.created}")
    versions = m.get("versions") or {}
    typer.echo(f"versions   {', '.join(f'{k} {v}' for k, v in versions.items() if v)}")
    recipe = m.get("recipe") or {}
    if recipe:
        model = recipe.get("model") or {}
        what = model.get("builtin") or model.get("artifact") or "?"
        data = (recipe.get("data") or {}).get("name", "?")
        typer.echo(f"recipe     {recipe.get('name', '?')}: {what} on {data}, seed {recipe.get('seed')}")
    methods = "; ".join(_method(st) for st in m.get("method") or [])
    typer.echo(f"method     {methods or ('none (dense)' if m.get('stages') else '-')}")
    recovery = m.get("recovery")
    if recovery is not None:
        parts = [
            f"{d['type']} {d['epochs']}" + (f" = {d['rounds']} rounds" if "rounds" in d else "")
            for d in recovery["stages"]
        ]
        typer.echo(f"recovery   {recovery['epochs']} epochs" + (f" ({', '.join(parts)})" if parts else ""))
    metrics = m.get("metrics") or {}
    latency = metrics.get("latency_ms") or {}
    shown = [(k, metrics.get(k)) for k in ("accuracy", "sparsity", "params", "nonzero_params", "size_bytes")]
    shown += [("p50 ms", latency.get("p50")), ("p99 ms", latency.get("p99"))]
    typer.echo(f"metrics    {', '.join(f'{k} {_fmt(v)}' for k, v in shown if v is not None) or '-'}")
    if m.get("note"):
        typer.echo(f"note       {m['note']}")
    typer.echo("files")
    for fname, rec in sorted(e.files.items()):
        typer.echo(f"  {fname:<40} {rec['bytes']:>12,} B  sha256 {rec['sha256']}")
    layers = m.get("layers") or []
    if layers:
        width = max(len(r["layer"]) for r in layers)
        typer.echo(f"layers\n  {'layer':<{width}}  {'sparsity':>8}  pattern")
        for r in layers:
            typer.echo(f"  {r['layer']:<{width}}  {r['sparsity']:>8.4f}  {r.get('pattern', '')}")


def _relation(s: Store, a: Entry, b: Entry) -> str:
    if a.hash in {x.hash for x in s.lineage(b.hash)}:
        return "B descends from A"
    if b.hash in {x.hash for x in s.lineage(a.hash)}:
        return "A descends from B"
    return "different lineages"


@store_app.command("diff")
def diff(
    a: str = typer.Argument(..., help="The first entry (name, hash prefix or 'current')."),
    b: str = typer.Argument(..., help="The second entry."),
    store: Path = _STORE,
    as_json: bool = _JSON,
) -> None:
    """Metrics and per-layer sparsity of A and B side by side, with B - A."""
    s = _open(store)
    ea, eb = s.get(a), s.get(b)
    d = s.diff(ea.hash, eb.hash)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"A  {_label(ea)}\nB  {_label(eb)}  ({_relation(s, ea, eb)})")
    for title, rows, key in (("metric", d["metrics"], "key"), ("layer sparsity", d["layers"], "layer")):
        if not rows:
            continue
        width = max([len(r[key]) for r in rows] + [len(title)])
        typer.echo(f"\n{title:<{width}}  {'A':>12}  {'B':>12}  {'B - A':>12}")
        for r in rows:
            typer.echo(
                f"{r[key]:<{width}}  {_fmt(r['a']):>12}  {_fmt(r['b']):>12}  {_signed(r['delta']):>12}"
            )
    same = [f["file"] for f in d["files"] if f["a"] == f["b"]]
    only_a = [f["file"] for f in d["files"] if f["b"] is None]
    only_b = [f["file"] for f in d["files"] if f["a"] is None]
    changed = [f["file"] for f in d["files"] if f["a"] and f["b"] and f["a"] != f["b"]]
    typer.echo("")
    for what, names in (
        ("identical", same),
        ("only in A", only_a),
        ("only in B", only_b),
        ("differ", changed),
    ):
        if names:
            typer.echo(f"files {what}: {', '.join(names)}")


@store_app.command("rollback")
def rollback(
    name: str = typer.Argument(None, help="The entry to make current (default: the current one's parent)."),
    store: Path = _STORE,
    to: Path = typer.Option(None, "--to", help="Also copy its files into this directory (for deployment)."),
) -> None:
    """Make an earlier entry current again (recorded in the history; nothing is deleted)."""
    s = _open(store)
    if to is not None:
        s.check_outside(to, "--to")
    previous = s.current()
    entry = s.rollback(name, to=to)
    if previous is not None and previous.hash == entry.hash:
        typer.echo(f"current: {_label(entry)} (unchanged)")
    else:
        was = f", was {_label(previous)}" if previous is not None else ""
        typer.echo(f"current: {_label(entry)}{was}")
    if to is not None:
        for fname in sorted(entry.files):
            typer.echo(f"wrote {to / fname}")


@store_app.command("history")
def history(store: Path = _STORE, as_json: bool = _JSON) -> None:
    """Every add and rollback, oldest first (the last one names the current entry)."""
    events = _open(store).history()
    if as_json:
        typer.echo(json.dumps(events, indent=2))
        return
    for event in events:
        typer.echo(
            f"{event['time'][:19].replace('T', ' ')}  {event['action']:<8}  {event['hash'][:12]}  "
            f"{event['name']}"
        )


@store_app.command("repair")
def repair(store: Path = _STORE) -> None:
    """Rebuild history.json from the entries (a damaged file is kept beside it); the entries are not
    touched."""
    s = _open(store)
    r = s.repair()
    if not r["changed"]:
        typer.echo(f"history.json is intact: {r['kept']} events, nothing to repair in {store}")
        return
    if r["backup"]:
        typer.echo(f"history.json was damaged: kept it as {r['backup']}")
    typer.echo(
        f"rebuilt history.json: {r['kept']} events kept, {r['dropped']} dropped (their entries are not "
        f"in the store), {r['added']} added for entries it lacked"
    )
    current = s.current()
    typer.echo(f"current: {_label(current)}" if current else "current: none (the store is empty)")


@store_app.command("verify")
def verify(
    names: list[str] = typer.Argument(None, help="Entries to check (default: the whole store)."),
    store: Path = _STORE,
) -> None:
    """Recompute every SHA-256; exit 1 naming each file that does not match its manifest."""
    report = _open(store).verify(names or None)
    leftovers = (
        f"; {report.leftovers} temp dirs of interrupted saves (ignored, removed by the next add)"
        if report.leftovers
        else ""
    )
    if not report.ok:
        for problem in report.problems:
            typer.echo(f"error: {problem}", err=True)
        n = len(report.problems)
        typer.echo(f"verify: {n} problem{'s' if n != 1 else ''} in {store}{leftovers}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"ok: {report.entries} entries, {report.files} files, {report.bytes:,} bytes match their "
        f"manifests in {store}{leftovers}"
    )


def store_run(store: Path, out: Path) -> None:
    """``prunekit run/demo --store DIR``: add the finished run's exports, one line per entry."""
    s = _open(store)
    before = {e.hash for e in s.list()} if s.exists() else set()
    for entry in s.add_run(out):
        verb = "stored" if entry.hash not in before else "already stored"
        typer.echo(f"{verb} {_label(entry)} in {store}")
