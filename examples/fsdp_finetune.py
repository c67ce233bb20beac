"""Fine-tune a pruned model with FSDP (fully sharded data parallel): each rank holds only a shard of every
parameter and of the optimizer state, for models that do not fit one device. Masks stay prunekit
parametrizations: they are buffers, which FSDP keeps whole on every rank, while the weight behind each
mask (``parametrizations.weight.original``) is sharded and gathered for each forward.

    torchrun --nproc-per-node 2 examples/fsdp_finetune.py --out fsdp-out

Runs on CPU with gloo (or one GPU per rank with nccl). The pruned weights stay exactly zero after the
sharded fine-tuning (checked on the gathered full state dict), and rank 0 saves the artifact.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from prunekit import Sparsifier
from prunekit.artifact import save_artifact
from prunekit.data import load_splits
from prunekit.masking import get_masks
from prunekit.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("fsdp-out"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank, hence the same masks

    data = load_splits("digits", seed=0)
    info = {"name": "resnet-digits", "args": {"widths": [16, 32], "blocks": 1}}
    model = build_model(info["name"], info["args"])
    sparsifier = Sparsifier(model, 0.8, criterion="magnitude", group="global")
    sparsifier.prepare()
    sparsifier.prune()  # computed identically on every rank from identical weights
    model.to(device)

    mesh = init_device_mesh(device.type, (world,))
    for block in model.layers:  # shard block by block, then the rest, as for a large model
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data.train, batch_size=32, sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            total += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch}: loss {float(total[0] / total[1]):.4f}")

    # gather the full (unsharded) state on rank 0: the weights behind the masks are zero where pruned
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        masks = get_masks(model)
        for name, mask in masks.items():
            weight = full[f"{name}.parametrizations.weight.original"]
            assert torch.count_nonzero(weight[~mask.cpu()]) == 0, name
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        print(f"masks kept {kept:.3f} of the weights; pruned weights still exactly zero")
        cpu_model = build_model(info["name"], info["args"])
        from prunekit.masking import load_masked_state_dict

        load_masked_state_dict(cpu_model, full)
        args.out.mkdir(parents=True, exist_ok=True)
        save_artifact(
            args.out / "fsdp.safetensors", cpu_model, model_info=info, specs=sparsifier.layer_specs()
        )
        print(f"wrote {args.out / 'fsdp.safetensors'}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
