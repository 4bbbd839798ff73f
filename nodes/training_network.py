"""The network a distillation job trains: ComfyUI's loaded weights in a module tree of its own, cut off from
ComfyUI's Cancel button, with gradient checkpointing over each family's repeated blocks."""

from __future__ import annotations

import contextlib
import types

import torch

from tdm_core import families
from tdm_core.distill.backend import shared_weights_copy


def training_network(model, device: torch.device, dtype: torch.dtype | None) -> torch.nn.Module:
    """The network a job trains its adapters into: ComfyUI's loaded diffusion model, with the MODEL's weight patches
    applied, as a module tree of its own whose frozen weights *are* ComfyUI's tensors (no copy) — unless the job
    asks for another device or dtype, and then only the converted copy exists on that device.

    Why a tree of its own: peft wraps the layers it adapts and the job swaps their forwards (checkpointing, Cancel);
    doing that to `model.model.diffusion_model` would change every prompt that samples the same MODEL while the job
    runs. Why shared weights: a deep copy held the teacher twice for the whole job (2× its size, plus 2× on the GPU
    while copying for `train_on_cpu`). Sharing is safe because ComfyUI never writes into a loaded weight: patching
    (LoRAs), unpatching and moving a model between devices all *replace* its tensors, so the job's aliases keep the
    values they had when the job started (the patched teacher), and a later change of ComfyUI's model reaches the
    job neither in values nor in structure.
    """
    import comfy.model_management

    # Applies the MODEL's patches (LoRAs on the teacher) to the weights on ComfyUI's device. For train_on_cpu on a
    # GPU machine the weights are then on the GPU once (ComfyUI's own) and the job's copy is made straight to the CPU.
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    network = shared_weights_copy(model.model.diffusion_model, device, dtype)
    make_uninterruptible(network)
    return network


def weight_memory(network: torch.nn.Module) -> frozenset[int]:
    """The memory addresses of a network's weights and buffers (what another tree may be sharing)."""
    return frozenset(t.data_ptr() for t in [*network.parameters(), *network.buffers()])


def shares_weights(network: torch.nn.Module, model) -> int:
    """How many of `network`'s weights use the memory of ComfyUI's loaded weights (tests and the memory bench)."""
    ours = weight_memory(model.model.diffusion_model)
    return sum(1 for p in network.parameters() if p.data_ptr() in ours)


def make_uninterruptible(network: torch.nn.Module) -> int:
    """Detaches the training tree from ComfyUI's Cancel button.

    Every `comfy.ops` layer calls `run_every_op()`, which raises (and clears) the process-wide interrupt flag that
    Cancel sets for the *prompt* being executed. A training thread running those layers would both die on an
    unrelated Cancel and swallow it, so the prompt it was meant for would go on. The tree's layers get the same
    forward function bound to a namespace whose `run_every_op` does nothing; the job has its own stop event.
    """
    count = 0
    for module in network.modules():
        function = type(module).forward
        code = getattr(function, "__code__", None)
        if code is None or "run_every_op" not in code.co_names:
            continue
        namespace = _quiet_namespaces.get(id(function.__globals__))
        if namespace is None:
            namespace = dict(function.__globals__, run_every_op=lambda: None)
            _quiet_namespaces[id(function.__globals__)] = namespace
        quiet = types.FunctionType(code, namespace, function.__name__, function.__defaults__, function.__closure__)
        module.forward = types.MethodType(quiet, module)
        count += 1
    return count


_quiet_namespaces: dict[int, dict] = {}


# The repeated blocks of each network layout ComfyUI builds, whose activations dominate training memory (each
# family's registry entry names its own), and those that add to their inputs in place (Flux's).
CHECKPOINTED_BLOCKS = tuple(dict.fromkeys(name for f in families.FAMILIES.values() for name in f.repeated_blocks))
INPUT_UPDATING_BLOCKS = tuple(dict.fromkeys(name for f in families.FAMILIES.values() if f.blocks_update_inputs_in_place
                                            for name in f.repeated_blocks))


def enable_gradient_checkpointing(network: torch.nn.Module) -> int:
    """Recomputes each top-level block in the backward pass instead of storing its activations; returns the number
    of blocks. A network with none of the known block lists is refused (the option would silently do nothing)."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for list_name in CHECKPOINTED_BLOCKS:
        blocks = getattr(network, list_name, None)
        copy_inputs = list_name in INPUT_UPDATING_BLOCKS
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                _wrap_checkpoint(block, checkpoint, copy_inputs)
                count += 1
        elif isinstance(blocks, torch.nn.Module):
            _wrap_checkpoint(blocks, checkpoint, copy_inputs)
            count += 1
    if count == 0:
        raise ValueError(f"gradient_checkpointing does not know the blocks of {type(network).__name__} (it knows "
                         f"{', '.join(CHECKPOINTED_BLOCKS)}); turn gradient_checkpointing off for this model")
    return count


def _wrap_checkpoint(block: torch.nn.Module, checkpoint, copy_inputs: bool = False) -> None:
    import comfy.model_management as model_management

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Newer ComfyUI picks some kernels by the process-wide `in_training` flag (Flux's adapter sets it for the
        # forward passes that record gradients); the backward pass recomputes the block after that forward has
        # returned, so the recomputation sets the flag it was first run under (the same kernels save the same
        # tensors, which the checkpoint requires).
        in_training = getattr(model_management, "in_training", None)

        def recomputable(*args, **kwargs):
            if copy_inputs:
                # The block updates its input tensors in place (Flux: `img += …`, `txt += …`), but the checkpoint
                # keeps its inputs, unchanged, to run the block again (autograd refuses a changed version): the
                # block gets copies made inside the recomputed region instead.
                args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if in_training is None:
                return forward(*args, **kwargs)
            with comfy_training_flag(in_training):
                return forward(*args, **kwargs)

        return checkpoint(recomputable, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


@contextlib.contextmanager
def comfy_training_flag(value: bool):
    """Sets newer ComfyUI's process-wide `model_management.in_training` (which picks kernels that have a backward)
    for the duration of a block, and puts the previous value back."""
    import comfy.model_management as model_management

    previous = model_management.in_training
    model_management.in_training = value
    try:
        yield
    finally:
        model_management.in_training = previous
