"""What an interrupted streamed prune needs to continue bit-identically, kept next to its output shards.

``<out>/.resume/run.json`` holds the run's fingerprint (source checkpoint, method, pattern, calibration
tokens, dtype) and, once computed, the OWL allocation; ``<out>/.resume/inputs.safetensors`` holds the inputs
of the next block to prune, with the block's index and the seconds spent so far in its metadata. Both are
written atomically, the inputs only after the previous block's shard is complete, so whatever a kill leaves
behind is consistent: block ``next_block`` is redone from exactly the inputs it would have received.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_json
from prunekit.llm.checkpoint import write_shard

STATE_DIR = ".resume"


def tensor_digest(tensor: torch.Tensor | None) -> str | None:
    """SHA-256 of a tensor's dtype, shape and bytes (the calibration tokens' identity)."""
    if tensor is None:
        return None
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class ResumeState:
    """The resume files of one output directory."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out) / STATE_DIR
        self.run_file = self.dir / "run.json"
        self.inputs_file = self.dir / "inputs.safetensors"

    def exists(self) -> bool:
        return self.run_file.is_file()

    def start(self, fingerprint: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_file, {"fingerprint": fingerprint})

    def run(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError) as exc:
            raise PrunekitError(f"{self.run_file} is unreadable ({exc}); delete {self.dir.parent}") from None

    def check(self, fingerprint: dict[str, Any]) -> None:
        """Raise unless the saved run was started with the same ``fingerprint``."""
        saved = self.run().get("fingerprint", {})
        differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if differ:
            raise PrunekitError(
                f"the interrupted run in {self.dir.parent} was started with other settings "
                f"({', '.join(differ)} differ): rerun it with the same arguments, or delete it to start over"
            )

    def update(self, **fields: Any) -> None:
        data = self.run()
        data.update(fields)
        atomic_write_json(self.run_file, data)

    def save_inputs(self, next_block: int, inputs: torch.Tensor | None, seconds: dict[str, float]) -> None:
        """The inputs of block ``next_block`` (None after the last block) and the seconds spent so far."""
        tensors = {"inputs": inputs if inputs is not None else torch.zeros(0)}
        meta = {"next_block": str(next_block), "seconds": json.dumps(seconds)}
        write_shard(self.inputs_file, tensors, metadata=meta)

    def load_inputs(self) -> tuple[int, torch.Tensor | None, dict[str, float]]:
        """``(next_block, its inputs or None, seconds so far)``; ``(0, None, {})`` before the first block."""
        if not self.inputs_file.is_file():
            return 0, None, {}
        with safe_open(str(self.inputs_file), framework="pt") as handle:
            meta = handle.metadata() or {}
            inputs = handle.get_tensor("inputs").clone()
        return int(meta["next_block"]), (inputs if inputs.numel() else None), json.loads(meta["seconds"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
