"""Prune inside your own training loop: 2:4 semi-structured for the hidden layers, AGP-gradual 80%
unstructured for the rest, one ``sparsifier.step()`` per optimizer step.

    python examples/own_training_loop.py [--steps 300]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import prunekit as pk
from prunekit.data import load_splits


def main(steps: int = 300) -> dict[str, float]:
    torch.manual_seed(0)
    data = load_splits("digits", seed=0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    sparsifier = pk.Sparsifier(
        model,
        0.8,  # the final sparsity the AGP schedule reaches
        criterion="magnitude",
        group="layer",
        overrides={"3": "2:4"},  # the second hidden layer: N:M instead
        schedule=pk.AGP(start=0, end=steps // 2, every=10),
    )
    sparsifier.prepare()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loader = data.loader("train", batch_size=64, shuffle=True)
    step = 0
    while step < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()  # prunes on the AGP schedule; masks keep pruned weights at exactly zero
            step += 1
            if step == steps:
                break
    sparsifier.squash()  # plain nn.Linear layers with the zeros written in
    model.eval()
    with torch.no_grad():
        x, y = data.test.tensors
        accuracy = float((model(x).argmax(1) == y).float().mean())
    sparsity = {name: float((model.get_submodule(name).weight == 0).float().mean()) for name in ("1", "3")}
    print(f"test accuracy {accuracy:.4f}; sparsity: layer 1 {sparsity['1']:.3f}, layer 3 {sparsity['3']:.3f}")
    return {"accuracy": accuracy, **sparsity}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
