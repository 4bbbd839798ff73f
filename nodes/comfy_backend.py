"""A TDM `TeacherBackend` over a ComfyUI MODEL: the trainer's view of a model loaded by ComfyUI's own loaders.

- **One teacher.** Training puts two peft adapters ("student", "fake") into the network it trains. Doing that to
  `model.model.diffusion_model` would change every prompt that samples from the same MODEL while the job runs, so
  the backend trains a module tree of its own (`training_network`) whose frozen weights are ComfyUI's loaded
  tensors, taken after ComfyUI has applied the MODEL's weight patches (LoRAs loaded on the teacher are part of the
  teacher): the process holds the teacher once. The tree is built on the prompt executor's thread, where ComfyUI's
  memory manager may move weights; the training thread then only ever touches its own tree.
- **Integer t ↔ the model's own schedule.** `comfy_schedule` builds the trainer's (α_t, σ_t) tables from the MODEL's
  `model_sampling`: VP models from ComfyUI's σ table (ᾱ = 1/(1 + σ²), the network sees the index t, as
  `model_sampling.timestep(σ_t)` gives back), rectified-flow models from the shifted flow table (α = 1 − σ, the
  network sees σ·1000). `DiscreteSchedule.with_pinned_grid` puts the sampling preset's exact grid into those tables (SD3: the flow-shift-6
  sigmas with their integer model timesteps 999, 947, 856, 666), so the student is trained at exactly the noise
  levels and timesteps the TDM sampler later evaluates it at.
- **Parametrisation.** The ComfyUI network is called on the VP state `x_t = α_t x0 + σ_t ε` — ComfyUI's own
  `calculate_input` of an ε/v model maps its VE state to exactly this, and a flow model's state already is it — and
  returns ε (SD1.5), v (v-models) or the flow velocity (SD3).
- **Export.** The student LoRA is written with ComfyUI-native keys `diffusion_model.<module>.lora_up.weight /
  .lora_down.weight / .alpha` (the keys `comfy.lora.model_lora_keys_unet` maps for every model), so ComfyUI's
  LoraLoader and the TDM LoRA Loader apply every tensor with no unmatched key.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass

import torch

from tdm_core import families, presets, schedules
from tdm_core.distill import DiscreteSchedule, PeftBackend
from tdm_core.lora import tdm_metadata

# What each family needs (LoRA targets, default preset, extra network inputs) is its registry entry and adapter.
from . import family_adapters
from .family_adapters import model_family  # noqa: F401  (the trainer's one import for reading a MODEL)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_parametrisation(model) -> str:
    return family_adapters.model_parametrisation(model.get_model_object("model_sampling"))


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def comfy_schedule(model_sampling) -> DiscreteSchedule:
    """(α_t, σ_t, model timestep) for t in [0, N) from a ComfyUI model_sampling object's own sigma table."""
    import comfy.model_sampling

    table = model_sampling.sigmas.detach().to("cpu", torch.float64)
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        multiplier = float(getattr(model_sampling, "multiplier", schedules.NUM_TRAIN_TIMESTEPS))
        return DiscreteSchedule.from_flow_sigmas(table, multiplier)
    return DiscreteSchedule.from_ve_sigmas(table)


@dataclass
class TrainingGrid:
    schedule: DiscreteSchedule
    timesteps: list[int] | None  # None: the training-demo grid from total_steps
    preset: str  # the TDM sampler preset the student is made for ("" for the demo grid)
    description: str


def training_grid(model, family: str, grid: str, steps: int, total_steps: int = 900,
                  latent_shape: tuple[int, ...] | None = None) -> TrainingGrid:
    """The trainer's schedule and K-step grid for a grid choice: "auto" (the family's preset), a preset name, or
    "training_demo" (t_k = N−1−k·N/K, sampled with the TDM Scheduler's training_demo grid). `latent_shape` (C, H, W)
    is the training latent's, which Flux's schedule depends on."""
    model_sampling = model.get_model_object("model_sampling")
    schedule = family_adapters.adapter(family).training_schedule(latent_shape) or comfy_schedule(model_sampling)
    if grid == "training_demo":
        return TrainingGrid(schedule, None, "", f"training_demo N={total_steps} K={steps}")
    name = families.FAMILIES[family].default_preset if grid == "auto" and family in families.FAMILIES else grid
    if name == "auto":
        raise ValueError(f"no TDM sampling preset for a {family} model; choose grid 'training_demo'")
    preset = presets.get_preset(name)
    parametrisation = model_parametrisation(model)
    if preset.parametrisation != parametrisation:
        raise ValueError(f"grid preset {name!r} is for {preset.parametrisation} models; this MODEL is "
                         f"{parametrisation} ({family}); use grid 'auto'")
    if not families.presets_fit(preset.family, family):
        raise ValueError(f"grid preset {name!r} is for {preset.family} models; this MODEL is {family}; use grid 'auto'")
    if preset.grid == "flux_shift":
        flux = schedules.flux_shift_grid(steps, schedules.flux_mu(int(latent_shape[-2]), int(latent_shape[-1])))
        sigmas = flux.sigmas[:-1]
        schedule, indices = schedule.with_pinned_grid(sigmas, sigmas)  # the network is fed σ itself
        return TrainingGrid(schedule, indices, name, f"{name}: σ {', '.join(f'{s:.4f}' for s in sigmas)}")
    if preset.grid == "flow_shift":
        flow = schedules.flow_shift_grid(steps, preset.shift)
        multiplier = float(getattr(model_sampling, "multiplier", schedules.NUM_TRAIN_TIMESTEPS))
        feed = [t * multiplier / schedules.NUM_TRAIN_TIMESTEPS for t in flow.timesteps]
        schedule, indices = schedule.with_pinned_grid(flow.sigmas[:-1], feed)
        return TrainingGrid(schedule, indices, name, f"{name}: σ {', '.join(f'{s:.4f}' for s in flow.sigmas[:-1])}")
    timesteps = list(schedules.grid_timesteps(preset.grid, steps, shift=preset.shift))
    return TrainingGrid(schedule, timesteps, name, f"{name}: t {', '.join(map(str, timesteps))}")


# ---------------------------------------------------------------------------------------------------------------
# Conditioning


def encode_prompts(clip, prompts: list[str], unconditional: str = "", model=None, family: str = "",
                   latent_shape: tuple[int, ...] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """CLIP-encodes each prompt (ComfyUI's CLIPTextEncode path) on the calling thread; "" maps to the
    unconditional prompt's encoding (the trainer's empty-prompt convention). Contexts of different lengths are
    repeated to a common length, as ComfyUI batches them (repeating keys leaves cross-attention unchanged).
    For SDXL and Flux, `model`, `family` and the training `latent_shape` give the other network inputs as ComfyUI's
    sampling builds them (family_adapters.FamilyAdapter.extra_inputs)."""
    texts = list(dict.fromkeys([*prompts, unconditional]))
    encoded = {}
    for text in texts:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        context, extra = conditioning[0][0], conditioning[0][1]
        with torch.inference_mode(False):
            entry = {"context": context.detach().clone()}
            if family in families.FAMILIES and families.FAMILIES[family].extra_inputs:
                entry.update(family_adapters.adapter(family).extra_inputs(model, extra, context, latent_shape))
                encoded[text] = entry
                continue
            pooled = extra.get("pooled_output")
            if pooled is not None:
                entry["y"] = pooled.detach().clone()
        encoded[text] = entry
    lengths = {e["context"].shape[1] for e in encoded.values()}
    common = math.lcm(*lengths)
    if common > 8 * max(lengths):
        common = max(lengths)  # pathological mixes: pad with zeros instead (masks nothing ComfyUI would not)
    for entry in encoded.values():
        context = entry["context"]
        if context.shape[1] != common:
            with torch.inference_mode(False):
                if common % context.shape[1] == 0:
                    entry["context"] = context.repeat(1, common // context.shape[1], 1)
                else:
                    pad = context.new_zeros(context.shape[0], common - context.shape[1], context.shape[2])
                    entry["context"] = torch.cat([context, pad], dim=1)
    table = {text: encoded[text] for text in prompts}
    table[""] = encoded[unconditional]
    return table


def release_text_encoders(clip) -> int:
    """Unloads the CLIP/T5 models from ComfyUI's device once the prompts are encoded: the job never needs them again
    (SD3's fp16 T5 alone is ~10 GB of VRAM). Returns how many loaded models were unloaded. They stay in ComfyUI's
    cache on the offload device and load again when a prompt encodes text."""
    import comfy.model_management

    patcher = getattr(clip, "patcher", None)
    if patcher is None:
        return 0
    loaded = comfy.model_management.current_loaded_models
    unloaded = 0
    for index in range(len(loaded) - 1, -1, -1):
        entry = loaded[index]
        model = entry.model
        if model is not None and (model is patcher or model.is_clone(patcher)) and entry.model_unload():
            loaded.pop(index)
            unloaded += 1
    if unloaded:
        comfy.model_management.soft_empty_cache()
    return unloaded


# ---------------------------------------------------------------------------------------------------------------
# The training network: ComfyUI's weights, a module tree of its own


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
    source = model.model.diffusion_model
    with torch.inference_mode(False):
        memo = {}
        for parameter in source.parameters():
            memo[id(parameter)] = torch.nn.Parameter(_alias(parameter), requires_grad=False)
        for buffer in source.buffers():
            memo[id(buffer)] = _alias(buffer)
        network = copy.deepcopy(source, memo)  # copies modules and attributes; the weights come from the memo
        network.to(device=device, dtype=dtype) if dtype is not None else network.to(device=device)
    network.requires_grad_(False)
    network.eval()
    make_uninterruptible(network)
    return network


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as `tensor`. ComfyUI loads weights under torch.inference_mode(), and
    autograd refuses to save an inference tensor for backward (every frozen Linear's weight is saved to compute the
    input's gradient); a plain tensor viewing the same storage is allowed. A tensor subclass (quantized weights)
    is copied instead: its storage is not its values."""
    data = tensor.detach()
    if type(data) is not torch.Tensor:
        return data.clone()
    alias = torch.empty(0, dtype=data.dtype, device=data.device)
    alias.set_(data.untyped_storage(), data.storage_offset(), data.size(), data.stride())
    return alias


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
            previous = model_management.in_training
            model_management.in_training = in_training
            try:
                return forward(*args, **kwargs)
            finally:
                model_management.in_training = previous

        return checkpoint(recomputable, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def teacher_fingerprint(network: torch.nn.Module, family: str, parametrisation: str, latent_channels: int) -> dict:
    """Enough to tell a different teacher apart on resume (shape signature and a weight checksum)."""
    params = list(network.parameters())
    with torch.no_grad():
        checksum = float(sum(p.detach().float().abs().sum().double().cpu() for p in params[:: max(1, len(params) // 32)]))
    return {"family": family, "parametrisation": parametrisation, "latent_channels": int(latent_channels),
            "parameters": int(sum(p.numel() for p in params)), "checksum": checksum}


class ComfyBackend(PeftBackend):
    """PeftBackend on the training tree of a ComfyUI diffusion model, exporting ComfyUI-native LoRA keys."""

    def __init__(self, network: torch.nn.Module, *, family: str, parametrisation: str, schedule: DiscreteSchedule,
                 latent_shape: tuple[int, ...], conds: dict[str, dict[str, torch.Tensor]], lora_rank: int,
                 lora_alpha: float | None, adapter_seed: int = 0, target_modules: list[str] | None = None):
        self.device = next(network.parameters()).device
        self._conds = {p: {k: v.to(self.device) for k, v in c.items()} for p, c in conds.items()}
        entry = families.FAMILIES[family]
        uses_pooled = entry.pooled_as_y
        extra_keys = entry.extra_inputs  # SDXL's ADM vector, Flux's pooled vector and guidance

        def encode(prompts: list[str]) -> dict:
            missing = [p for p in prompts if p not in self._conds]
            if missing:
                raise KeyError(f"prompt {missing[0]!r} was not encoded when the job started")
            batch = {"context": torch.cat([self._conds[p]["context"] for p in prompts])}
            if uses_pooled:
                batch["y"] = torch.cat([self._conds[p]["y"] for p in prompts])
            for key in extra_keys:
                batch[key] = torch.cat([self._conds[p][key] for p in prompts])
            return batch

        super().__init__(network, schedule=schedule, parametrisation=parametrisation, latent_shape=latent_shape,
                         encode=encode, call=self._call_network, family=family, mode="lora", export_format="comfyui",
                         lora_rank=lora_rank, lora_alpha=lora_alpha,
                         target_modules=target_modules or list(entry.lora_targets), adapter_seed=adapter_seed)

    def _call_network(self, network, x, model_t, cond):
        dtype = self.compute_dtype
        y = cond.get("y")
        extra = {}
        if "guidance" in cond:  # Flux-dev's guidance scale, float32 like the timesteps
            extra["guidance"] = cond["guidance"].float()
        out = network(x.to(dtype), model_t.float(), context=cond["context"].to(dtype),
                      y=None if y is None else y.to(dtype), **extra)
        return out.float()

    def to(self, device: torch.device, keep: frozenset[int] = frozenset()) -> None:
        """Moves the network (with its adapters) and the encoded prompts; used to park a waiting job on the CPU.
        Tensors whose memory is in `keep` stay where they are: weights ComfyUI still holds itself (parking them
        would free nothing on the device and add a copy on the CPU)."""
        device = torch.device(device)
        for table, name, tensor in self.tensors_to_move(device, keep):
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = tensor.data.to(device)  # the same Parameter: the optimiser's references stay valid
            else:
                table[name] = tensor.to(device)
        self.device = device
        self._conds = {p: {k: v.to(self.device) for k, v in c.items()} for p, c in self._conds.items()}
        self._cond_cache.clear()

    def tensors_to_move(self, device: torch.device, keep: frozenset[int] = frozenset()):
        """(table, name, tensor) of each parameter and buffer `to(device, keep)` moves: those not on `device` yet
        whose memory is not in `keep`."""
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None and tensor.device != device and tensor.data_ptr() not in keep:
                        yield table, name, tensor


# Pixels per latent cell of the image models TDM distils (SD1.5, SD3): the latent preview is shown at image size.
LATENT_TO_PIXELS = 8


def vae_preview_decoder(model, vae, device):
    """x0 (model latent space) → uint8 H×(B·W)×3 decoded by a private copy of the teacher's VAE on the training
    device. The job thread decodes with it directly, never through ComfyUI's memory manager, which belongs to the
    prompt executor's thread and may unload or move ComfyUI's own VAE at any time."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else getattr(vae, "vae_dtype", torch.float32)
    decoder = copy.deepcopy(vae.first_stage_model).to(device=device, dtype=dtype).eval()
    latent_format = model.model.latent_format

    def decode(x0: torch.Tensor):
        with torch.no_grad():
            latents = latent_format.process_out(x0.detach().to(device, torch.float32)).to(dtype)
            images = decoder.decode(latents).float()  # ComfyUI's VAE models decode to [-1, 1]
        images = ((images + 1.0) / 2.0).clamp(0, 1).movedim(1, -1).cpu()
        strip = torch.cat(list(images), dim=1)
        return (strip * 255).round().to(torch.uint8).numpy()

    return decode


def latent_preview_decoder(model):
    """x0 (model latent space, [B, C, H, W]) → uint8 H×(B·W)×3 at image size, with the latent format's RGB factors
    (ComfyUI's own cheap live preview, upscaled ×8 so it reads at the size the samples have)."""
    latent_format = model.model.latent_format
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        return None
    weight = torch.tensor(factors, dtype=torch.float32).transpose(0, 1)
    bias_values = getattr(latent_format, "latent_rgb_factors_bias", None)
    bias = torch.tensor(bias_values, dtype=torch.float32) if bias_values is not None else None

    def decode(x0: torch.Tensor):
        x0 = x0.detach().to("cpu", torch.float32)
        images = torch.nn.functional.linear(x0.movedim(1, -1), weight, bias)  # [B, H, W, 3]
        images = torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=LATENT_TO_PIXELS,
                                                 mode="bilinear", align_corners=False).movedim(1, -1)
        images = ((images + 1.0) / 2.0).clamp(0, 1)
        strip = torch.cat(list(images), dim=1)
        return (strip * 255).round().to(torch.uint8).numpy()

    return decode


def family_metadata(preset: str, family: str, recipe_changes=None) -> dict:
    """The TDM header entries TDM Distill's node adds to its student (tdm_core.lora.metadata): the preset, family
    and strength the LoRA loader's `auto` reads, and the recipe knobs the user changed (`recipe_changes`, names)."""
    return tdm_metadata(preset=preset or None, family=family, strength=1.0, recipe_changes=recipe_changes)
