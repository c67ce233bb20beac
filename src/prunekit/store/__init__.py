"""Versioned artifacts with lineage: the dense original and each compressed version, with manifests.

    from prunekit.store import Store
    store = Store("artifacts")
    store.add_run("prunekit-demo")          # dense -> pruned -> pruned-int8, each the child of the one before
    store.add(["model.safetensors"], name="mine/v2", parent="mine/v1", meta={"metrics": {"accuracy": 0.97}})
    store.list(); store.get("mine/v2"); store.diff("mine/v1", "mine/v2")
    store.rollback("mine/v1", to="deploy/")  # make v1 current again and copy its files out
    assert store.verify().ok                 # every SHA-256 recomputed

Layout, crash and concurrency guarantees: :mod:`prunekit.store.store`; the manifest:
:mod:`prunekit.store.manifest`; the command line: ``prunekit store --help`` and docs/store.md.
This package never imports torch: storing and checking files does not need it.
"""

from prunekit.store.manifest import Entry
from prunekit.store.store import Store, enclosing_store, refuse_inside_store
from prunekit.store.verify import VerifyReport

__all__ = ["Entry", "Store", "VerifyReport", "enclosing_store", "refuse_inside_store"]
