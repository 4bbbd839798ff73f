"""What TDM distillation needs to know about each model family it supports, kept apart from how the teacher is held.

One table per question, so adding a family touches these tables and nothing in the trainer:

- `FAMILY_TARGETS`: the modules the student and fake-score LoRAs patch, by ComfyUI module name (the exported LoRA
  uses the same names, so ComfyUI's LoraLoader maps every key).
- `EXTRA_INPUTS`: the network inputs besides the text context, built exactly as ComfyUI's own sampling builds them
  (`model.model.extra_conds`, the function `comfy.samplers.encode_model_conds` calls): SDXL's `y` (pooled text
  embedding + six size/crop embeddings, with width/height defaulting to the latent size × 8 as ComfyUI does), Flux's
  `y` (pooled CLIP-L) and `guidance` (the conditioning's value, FluxGuidance's; ComfyUI's default 3.5).
- `family_schedule`: Flux's training table follows its resolution-dependent shift at the training size
  (`schedules.flux_mu`), not the single shift stored on the MODEL; every other family uses the MODEL's own table.

**TDM on a guidance-distilled teacher (Flux-dev).** TDM's target is the teacher's *guided* score,
r = r_u + s (r_c − r_u). Flux-dev was itself distilled from a CFG teacher into one pass that takes the guidance scale
as an input, so its single pass at guidance g already is that guided score: the target is that pass (cfg must be 1,
no second, unconditional pass), and g is the conditioning's guidance. The fake score models the *student's*
distribution, which is the distribution of samples made under guidance g, so it sees the same g (as every other
conditioning input), and so does the student; at sampling time the student is used with the same g. The three
networks share the base weights and its guidance embedding; only the LoRAs differ.
"""

from __future__ import annotations

import torch

from tdm_core import schedules
from tdm_core.distill import DiscreteSchedule
from tdm_core.distill.backend import UNET_TARGETS
from tdm_core.families import DISTILLABLE_FAMILY_LABELS, distillable_families_text

# ComfyUI's MMDiT (SD3/SD3.5): the joint blocks' attention (fused qkv), output projections and MLPs; SD3.5's dual
# attention (`attn2`) too. The SD1.5 and SDXL UNets' transformer blocks use the same names as diffusers' (to_q, ...).
MMDIT_TARGETS = ["attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2"]
# ComfyUI's Flux: the double blocks' image and text attention (fused qkv, output) and MLPs, and the single blocks'
# fused qkv+MLP input and output projections — the layers diffusers' Flux LoRAs patch, in ComfyUI's names.
FLUX_TARGETS = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2"]
FAMILY_TARGETS = {"sd15": UNET_TARGETS, "sdxl": UNET_TARGETS, "sd3": MMDIT_TARGETS, "sd35": MMDIT_TARGETS,
                  "flux": FLUX_TARGETS}
# The sampling preset a family's student is trained for by default (grid "auto").
FAMILY_PRESET = {"sd15": "dreamshaper", "sdxl": "sdxl", "sd3": "sd3", "sd35": "sd35", "flux": "flux"}
# Network inputs (besides the context) that ComfyUI's `extra_conds` builds for these families; SD1.5 has none and
# SD3/SD3.5 pass their pooled output as `y` directly (comfy_backend.encode_prompts).
EXTRA_INPUTS = {"sdxl": ("y",), "flux": ("y", "guidance")}



def check_distillable(model, family: str, cfg: float | None = None) -> None:
    """Refuses, before anything is copied or encoded, a MODEL the trainer cannot distil, naming what would work;
    with `cfg`, also a teacher guidance the family cannot train with."""
    if family not in FAMILY_TARGETS:
        config = type(model.model.model_config).__name__
        raise ValueError(f"TDM distillation does not support this MODEL: family {family!r} ({config}); supported "
                         f"families: {distillable_families_text()}")
    if family == "flux":
        params = getattr(model.model.diffusion_model, "params", None)
        if not getattr(params, "guidance_embed", False):
            raise ValueError("this Flux MODEL has no guidance input (Flux-schnell or a de-distilled Flux): TDM "
                             "distillation supports Flux-dev; Flux-schnell already samples in 1–4 steps")
        if cfg is not None and float(cfg) != 1.0:
            raise ValueError(f"cfg is {cfg:g}, but Flux-dev is guidance-distilled: its guidance is the conditioning's "
                             "`guidance` (FluxGuidance, 3.5 by default), not a second, unconditional pass. Set cfg "
                             "to 1")


def extra_inputs(model, family: str, extra: dict, context: torch.Tensor,
                 latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The network inputs besides the context for one CLIP encoding (`extra` is its conditioning dict), as ComfyUI's
    `encode_model_conds` builds them for a latent of `latent_shape` (C, H, W)."""
    keys = EXTRA_INPUTS.get(family)
    if not keys:
        return {}
    channels, height, width = (int(s) for s in latent_shape)
    params = dict(extra)
    params.update(device=torch.device("cpu"), noise=torch.zeros(1, channels, height, width), cross_attn=context,
                  prompt_type=params.get("prompt_type", "positive"))
    params.setdefault("width", width * 8)  # ComfyUI's defaults: the latent size in pixels
    params.setdefault("height", height * 8)
    built = model.model.extra_conds(**params)
    missing = [key for key in keys if key not in built]
    if missing:
        raise ValueError(f"ComfyUI built no {missing[0]!r} input for this {DISTILLABLE_FAMILY_LABELS[family]} MODEL "
                         "from the CLIP's conditioning (a CLIP without pooled output?); load the model's own text "
                         "encoders")
    return {key: built[key].cond.detach().clone() for key in keys}


# ComfyUI's Flux blocks update their residual stream in place (`x += gate * out`) after a LayerNorm has saved that
# same tensor for its backward pass, which autograd refuses once a gradient flows through the block (the student
# update). These norms are given a copy of their input while gradients are recorded; sampling is unaffected.
_INPLACE_RESIDUAL_NORMS = {"flux": ("pre_norm", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2")}


def _flag_training_while_recording_gradients(network: torch.nn.Module) -> None:
    """Newer ComfyUI computes Flux's rotary embedding with a fused kernel that has no backward; its own LoRA trainer
    switches to the plain-torch formula (same maths) through `model_management.in_training`. That flag is
    process-wide, so it is set only for the duration of a forward that records gradients (the student update)."""
    import comfy.model_management as model_management

    if not hasattr(model_management, "in_training"):
        return  # ComfyUI 0.3.75: plain torch only
    forward = network.forward

    def forward_with_training_flag(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        previous = model_management.in_training
        model_management.in_training = True
        try:
            return forward(*args, **kwargs)
        finally:
            model_management.in_training = previous

    network.forward = forward_with_training_flag


def prepare_for_training(family: str, network: torch.nn.Module) -> int:
    """Makes a family's network trainable through its blocks; returns how many modules were adapted."""
    names = _INPLACE_RESIDUAL_NORMS.get(family, ())
    if family == "flux" and not getattr(network, "_tdm_training_flag", False):
        _flag_training_while_recording_gradients(network)
        network._tdm_training_flag = True
    count = 0
    for name, module in network.named_modules():
        if name.rsplit(".", 1)[-1] in names and not getattr(module, "_tdm_copies_input", False):
            forward = module.forward

            def copying_forward(x, *args, _forward=forward, **kwargs):
                return _forward(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

            module.forward = copying_forward
            module._tdm_copies_input = True
            count += 1
    return count


def flux_training_schedule(latent_height: int, latent_width: int) -> DiscreteSchedule:
    """Flux's flow table at the training size: σ_t = flux_time_shift(μ, (t + 1)/1000), α = 1 − σ, and the network is
    given σ itself (ComfyUI's Flux model sampling: timestep(σ) = σ; diffusers: timestep / 1000)."""
    mu = schedules.flux_mu(latent_height, latent_width)
    u = torch.arange(1, schedules.NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64) / schedules.NUM_TRAIN_TIMESTEPS
    sigmas = torch.as_tensor(schedules.flux_time_shift(mu, u.numpy()), dtype=torch.float64)
    return DiscreteSchedule.from_flow_sigmas(sigmas, multiplier=1.0)


def family_schedule(family: str, latent_shape: tuple[int, ...] | None) -> DiscreteSchedule | None:
    """The family's own training table, or None to use the MODEL's model_sampling table."""
    if family == "flux":
        if latent_shape is None:
            raise ValueError("Flux's schedule depends on the latent size; give the training width and height")
        return flux_training_schedule(int(latent_shape[-2]), int(latent_shape[-1]))
    return None


def flux_pinned_grid(schedule: DiscreteSchedule, steps: int, latent_shape: tuple[int, ...]):
    """The `flux` preset's grid at the training size, written exactly into the table: (schedule, indices, sigmas)."""
    grid = schedules.flux_shift_grid(steps, schedules.flux_mu(int(latent_shape[-2]), int(latent_shape[-1])))
    sigmas = grid.sigmas[:-1]
    pinned, indices = schedule.with_pinned_grid(sigmas, sigmas)  # the network is fed σ itself
    return pinned, indices, sigmas
