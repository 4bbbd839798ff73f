"""A TDM `TeacherBackend` over a ComfyUI MODEL: the trainer's view of a model loaded by ComfyUI's own loaders.

- **One teacher.** Training puts two peft adapters ("student", "fake") into the network it trains. Doing that to
  `model.model.diffusion_model` would change every prompt that samples from the same MODEL while the job runs, so
  the backend trains a module tree of its own (nodes/training_network.py) whose frozen weights are ComfyUI's loaded
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

import torch

from tdm_core import families, schedules
from tdm_core.distill import DiscreteSchedule, PeftBackend
from tdm_core.distill.grids import TrainingGrid, choose_grid
from tdm_core.lora import tdm_metadata

# What each family needs (LoRA targets, default preset, extra network inputs) is its registry entry and adapter.
from . import family_adapters

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


def training_grid(model, family: str, grid: str, steps: int, total_steps: int = 900,
                  latent_shape: tuple[int, ...] | None = None) -> TrainingGrid:
    """The trainer's schedule and K-step grid for a grid choice: "auto" (the family's preset), a preset name, or
    "training_demo" (t_k = N−1−k·N/K, sampled with the TDM Scheduler's training_demo grid). `latent_shape` (C, H, W)
    is the training latent's, which Flux's schedule depends on."""
    model_sampling = model.get_model_object("model_sampling")
    schedule = family_adapters.adapter(family).training_schedule(latent_shape) or comfy_schedule(model_sampling)
    multiplier = float(getattr(model_sampling, "multiplier", schedules.NUM_TRAIN_TIMESTEPS))
    return choose_grid(schedule, family, model_parametrisation(model), grid, steps, total_steps,
                       latent_shape=latent_shape, multiplier=multiplier, teacher="MODEL")


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
        """PeftBackend.to, and the prompts encoded when the job started go along."""
        super().to(device, keep)
        self._conds = {p: {k: v.to(self.device) for k, v in c.items()} for p, c in self._conds.items()}


# Pixels per latent cell of the models TDM distils (SD1.5, SD3, Wan): the latent preview is shown at image size.
LATENT_TO_PIXELS = 8
# Frames a video sample shows in the preview: evenly spaced from its first frame to its last, so the preview shows
# the motion (one frame alone cannot tell a moving clip from a still one) at the size of one more image row each.
PREVIEW_FRAMES = 4


def preview_frame_indices(count: int, shown: int = PREVIEW_FRAMES) -> list[int]:
    """`shown` indices of `count` frames evenly spaced from the first to the last (all of them when fewer)."""
    if count <= shown:
        return list(range(count))
    return [round(i * (count - 1) / (shown - 1)) for i in range(shown)]


def preview_grid(images: torch.Tensor):
    """[B, F, H, W, 3] in [0, 1] (F = 1 for images) → uint8 (F·H)×(B·W)×3: the samples side by side, as an image job's
    strip, and a video sample's frames below each other in time order (a PNG the Status node and the jobs panel
    already show; GET /tdm/jobs/<job>/preview.png stays a still PNG)."""
    columns = [torch.cat(list(sample), dim=0) for sample in images]  # each sample's frames stacked downwards
    grid = torch.cat(columns, dim=1)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def vae_preview_decoder(model, vae, device):
    """x0 (model latent space) → uint8 (F·H)×(B·W)×3 (`preview_grid`) decoded by a private copy of the teacher's VAE
    on the training device. The job thread decodes with it directly, never through ComfyUI's memory manager, which
    belongs to the prompt executor's thread and may unload or move ComfyUI's own VAE at any time. A video latent
    [B, C, T, h, w] is decoded whole, one sample at a time (Wan's VAE is causal: a later frame depends on every
    latent frame before it, so no frame but the first can be decoded alone), and shows PREVIEW_FRAMES of its frames."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else getattr(vae, "vae_dtype", torch.float32)
    decoder = copy.deepcopy(vae.first_stage_model).to(device=device, dtype=dtype).eval()
    latent_format = model.model.latent_format

    def decode(x0: torch.Tensor):
        samples = []
        with torch.no_grad():
            for latent in x0.detach():  # one sample at a time: a whole decoded clip each, not the batch's
                latents = latent_format.process_out(latent[None].to(device, torch.float32)).to(dtype)
                images = decoder.decode(latents).float()[0]  # ComfyUI's VAE models decode to [-1, 1]
                if images.ndim == 4:  # [3, frames, H, W]
                    images = images[:, preview_frame_indices(images.shape[1])]
                else:
                    images = images[:, None]
                samples.append(((images + 1.0) / 2.0).movedim(0, -1).cpu())  # [F, H, W, 3]
        return preview_grid(torch.stack(samples))

    return decode


def latent_preview_decoder(model):
    """x0 (model latent space, [B, C, H, W], or a video's [B, C, T, H, W]) → uint8 (F·H)×(B·W)×3 (`preview_grid`) at
    image size, with the latent format's RGB factors (ComfyUI's own cheap live preview, upscaled ×8 so it reads at
    the size the samples have). A video shows PREVIEW_FRAMES of its latent frames, first to last (each latent frame
    after Wan's first stands for four frames of the clip)."""
    latent_format = model.model.latent_format
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        return None
    weight = torch.tensor(factors, dtype=torch.float32).transpose(0, 1)
    bias_values = getattr(latent_format, "latent_rgb_factors_bias", None)
    bias = torch.tensor(bias_values, dtype=torch.float32) if bias_values is not None else None

    def decode(x0: torch.Tensor):
        x0 = x0.detach().to("cpu", torch.float32)
        x0 = x0[:, :, preview_frame_indices(x0.shape[2])] if x0.ndim == 5 else x0[:, :, None]
        batch, frames = x0.shape[0], x0.shape[2]
        flat = x0.movedim(2, 1).flatten(0, 1)  # [B·F, C, h, w]
        images = torch.nn.functional.linear(flat.movedim(1, -1), weight, bias)  # [B·F, h, w, 3]
        images = torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=LATENT_TO_PIXELS,
                                                 mode="bilinear", align_corners=False).movedim(1, -1)
        images = (images + 1.0) / 2.0
        return preview_grid(images.unflatten(0, (batch, frames)))

    return decode


def family_metadata(preset: str, family: str, recipe_changes=None) -> dict:
    """The TDM header entries TDM Distill's node adds to its student (tdm_core.lora.metadata): the preset, family
    and strength the LoRA loader's `auto` reads, and the recipe knobs the user changed (`recipe_changes`, names)."""
    return tdm_metadata(preset=preset or None, family=family, strength=1.0, recipe_changes=recipe_changes)
