"""FSDP for the headless trainer (`DistillConfig.parallel = "fsdp"` under torchrun): torch's own `fully_shard` (FSDP2).

The plan: every repeated block of the network is one FSDP unit (`shard_units`: a diffusers model's down/mid/up blocks
or transformer blocks, a ComfyUI network's `families.repeated_blocks`; a network with none of those, such as the tiny
reference MLP, shards each top-level child that holds parameters), and the network itself is the root unit holding
what is left (embeddings, norms, projections). A unit's parameters — its frozen base weights and both LoRA adapters
inside it — are split along their first dimension across the processes; a unit's forward all-gathers them and frees
them again after it (the root keeps its own until the backward). The adapters are sharded with the base (the same
unit): their gradients are reduce-scattered (averaged) by FSDP in the backward, and each process's AdamW holds the
state of its own shard only. The frozen base gets no gradient, so it is never reduced.

The adapters stay float32 over a bf16 base: FSDP2 all-gathers a unit's mixed dtypes as bytes, and reduces only the
gradients, which are all float32.

What the trainer does differently under FSDP (everything else is the data-parallel code):
  - no hand-written gradient averaging (FSDP's reduce-scatter did it);
  - gradient norm, clipping and the non-finite check by `global_norm` over the local shards, with one all-reduce that
    also carries whether each process's loss is finite, so that every process applies or skips an update alike;
  - every forward is a collective: every process runs the same number of network evaluations (the rollout's length
    is the global batch's, previews are sampled by every process);
  - checkpoints keep the one format of full tensors: `full` gathers adapters and optimiser states on every process
    (collective), process 0 writes; loading gives each process its shard of the full tensors (`shard_like`), so a run
    resumes on any number of processes, and a ComfyUI job's checkpoint is a checkpoint of it.
"""

from __future__ import annotations

import warnings

import torch

from .. import families

# The repeated blocks of diffusers' networks the headless backends load (UNet2DConditionModel's, the MMDiT/Flux/
# CogVideoX transformers'), then those of ComfyUI's networks (the families' registry).
DIFFUSERS_BLOCKS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")
BLOCK_NAMES = tuple(dict.fromkeys(DIFFUSERS_BLOCKS + tuple(
    name for family in families.FAMILIES.values() for name in family.repeated_blocks)))


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor; a plain tensor is its own."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded one: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value`, a full tensor of `param`'s shape, as `param` is laid out: this process's shard of it for a sharded
    parameter (every process holds the same full value, read from one checkpoint, so each takes its own chunk: no
    communication), `value` itself otherwise."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def shard_units(model: torch.nn.Module, block_names: tuple[str, ...] | None = None) -> list[torch.nn.Module]:
    """The modules that become FSDP units below the root: each element of the model's repeated-block lists (a single
    block module counts as one), else each top-level child that holds parameters."""
    units: list[torch.nn.Module] = []
    for name in block_names or BLOCK_NAMES:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            units.extend(block for block in blocks if any(True for _ in block.parameters()))
        elif isinstance(blocks, torch.nn.Module):
            units.append(blocks)
    if not units:
        units = [child for child in model.children() if any(True for _ in child.parameters())]
    return units


def shard_model(model: torch.nn.Module, mesh, block_names: tuple[str, ...] | None = None) -> int:
    """Shards `model` in place (see the module docstring) over device mesh `mesh`; returns the number of units below
    the root. The parameters are new `DTensor` objects afterwards: whoever listed them lists them again."""
    from torch.distributed.fsdp import fully_shard

    units = shard_units(model, block_names)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP2 warns once that a unit returned a view (the reference MLP's `.view(x.shape)`), because an in-place op on
    # it would skip the pre-backward all-gather; the trainer and its losses never modify a prediction in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return len(units)


def device_mesh(world: int, device: torch.device):
    """The 1-D mesh of all processes on this process's device type (cuda with nccl, cpu with gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def global_norm(tensors: list[torch.Tensor], finite_flag: torch.Tensor | None = None):
    """(2-norm over all processes' shards of `tensors`, whether `finite_flag` is finite on every process), with one
    all-reduce: the same two answers on every process. Collective."""
    device = local(tensors[0]).device if tensors else (finite_flag.device if finite_flag is not None else "cpu")
    parts = [local(t).detach() for t in tensors]
    squares = torch.stack([n.float().square() for n in torch._foreach_norm(parts)]).sum() if parts else torch.zeros(
        (), device=device)
    bad = torch.zeros((), device=device) if finite_flag is None else (
        ~torch.isfinite(finite_flag.detach().float())).float().to(device)
    packed = torch.stack([squares.to(device), bad])
    torch.distributed.all_reduce(packed)
    return packed[0].sqrt(), packed[1] == 0


def clip_(tensors: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scales `tensors` (local shards) as `torch.nn.utils.clip_grad_norm_` does, given their global norm."""
    if not tensors:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([local(t) for t in tensors], coef.to(local(tensors[0]).device))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole: the format of an unsharded
    optimiser over the same parameters (collective, in the state's own order on every process)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: full(value) if isinstance(value, torch.Tensor) else value
                              for key, value in entries.items()}
                      for index, entries in state["state"].items()}
    return state


def sharded_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """A full optimiser state (any process count's checkpoint) laid out as `params` are: each state tensor of a
    parameter's shape becomes this process's shard of it; scalars (AdamW's step) stay as they are."""
    out = dict(state)
    out["state"] = {}
    for index, entries in state["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        out["state"][index] = {
            key: shard_like(value, param) if (param is not None and isinstance(value, torch.Tensor)
                                              and value.shape == param.shape and value.dim() > 0) else value
            for key, value in entries.items()}
    return out


def local_numel(params) -> int:
    """Elements of `params` this process holds (its shards' for sharded parameters)."""
    return sum(local(p).numel() for p in params)
