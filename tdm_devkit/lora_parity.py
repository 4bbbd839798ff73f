"""The LoRA parity cases and the model calls both sides run: a LoRA file applied by diffusers (the official recipe) on
the diffusers twin, by the TDM loader on the ComfyUI twin, and the twin's own merged weights (W + s·scale·up@down).
Shared by tests/test_lora_parity.py (which holds each case to a tolerance) and bench/lora.py (which reports the
distances)."""

from __future__ import annotations

import torch

from . import lora_files, twins

STRENGTHS = (0.125, 1.0)


def _sd15_inputs():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, twins.SD15_CONTEXT_DIM, generator=g)
    return x, torch.tensor([500.0]), context


def _sd3_inputs():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, twins.SD3_LATENT_CHANNELS, 16, 16, generator=g)
    context = torch.randn(2, 5, twins.SD3_JOINT_ATTENTION_DIM, generator=g)
    pooled = torch.randn(2, twins.SD3_POOLED_DIM, generator=g)
    return x, torch.tensor([999.0, 666.0]), context, pooled


def diffusers_output(module, family, weights=None):
    """The diffusers model's output, optionally with `weights` substituted for its own (no copy of the model)."""

    def call(*args, **kwargs):
        if weights is None:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, weights, args, kwargs)

    with torch.no_grad():
        if family == "sd15":
            x, t, context = _sd15_inputs()
            return call(x, t, encoder_hidden_states=context).sample
        x, t, context, pooled = _sd3_inputs()
        return call(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample


def comfy_output(patcher, family):
    """Runs the ComfyUI model with its patches applied (the way a sampler loads it), then unloads it so the shared
    twin is left unpatched for the next caller."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            net = patcher.model.diffusion_model
            if family == "sd15":
                x, t, context = _sd15_inputs()
                return net(x, timesteps=t, context=context)
            x, t, context, pooled = _sd3_inputs()
            return net(x, t, y=pooled, context=context)
    finally:
        comfy.model_management.unload_all_models()


def diffusers_pipeline(module, family):
    """A pipeline holding only the denoiser: `load_lora_weights` is a pipeline method and these are its code paths."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if family == "sd15":
        return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=module, scheduler=None,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusion3Pipeline(transformer=module, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def merged_output(twin, lora, strength):
    weights = lora.merged_state_dict(twin.diffusers.state_dict(), strength)
    return diffusers_output(twin.diffusers, "sd15" if twin.family == "sd15" else "sd3", weights)


def case_targets(twin, options):
    """The modules a case's synthetic LoRA targets: every LoRA target of the twin, or the subset `options["targets"]`
    names ("attention": q/k/v/out only, as old diffusers attention processors; "transformer": what peft trainers
    target, attention, ff and proj_in/out)."""
    targets = lora_files.lora_targets(twin.diffusers, twin.family)
    if options.get("targets") == "attention":
        return [t for t in targets if t.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or t.endswith("to_out.0")]
    if options.get("targets") == "transformer":
        return [t for t in targets if ".attentions." in t]
    return targets


# (id, twin fixture, options, writer, diffusers can load it)
CASES = [
    ("sd15-kohya-pt-alpha", "sd15_twin", dict(alpha=2.0), lambda lora, p, tw: lora_files.write_kohya(lora, p / "dreamshaper_like.pt"), True),
    ("sd15-peft-unet-prefix", "sd15_twin", dict(targets="transformer"), lambda lora, p, tw: lora_files.write_peft(lora, p / "sd15_peft.safetensors"), True),
    ("sd15-peft-no-prefix-alpha-metadata", "sd15_twin", dict(alpha=8.0, targets="transformer"), lambda lora, p, tw: lora_files.write_peft(lora, p / "sd15_peft_np.safetensors", prefix="", alpha_in="metadata"), False),
    ("sd15-old-diffusers-attn-procs", "sd15_twin", dict(targets="attention"), lambda lora, p, tw: lora_files.write_old_diffusers(lora, p / "sd15_old.bin"), True),
    ("sd15-comfy-native", "sd15_twin", dict(alpha=2.0, targets="transformer"), lambda lora, p, tw: lora_files.write_comfy_native(lora, p / "sd15_native.safetensors", tw), False),
    ("sd3-peft-no-alpha", "sd3_twin", dict(), lambda lora, p, tw: lora_files.write_peft(lora, p / "tdm_sd3_like.safetensors"), True),
    ("sd3-peft-alpha-metadata", "sd3_twin", dict(alpha=2.0), lambda lora, p, tw: lora_files.write_peft(lora, p / "sd3_meta.safetensors", alpha_in="metadata"), True),
    ("sd3-peft-alpha-keys", "sd3_twin", dict(alpha=2.0), lambda lora, p, tw: lora_files.write_peft(lora, p / "sd3_keys.safetensors", alpha_in="keys"), False),
    ("sd35-peft-attn2", "sd35_twin", dict(), lambda lora, p, tw: lora_files.write_peft(lora, p / "tdm_sd35_like.safetensors"), True),
    ("sd3-comfy-native-fused-qkv", "sd3_twin", dict(alpha=2.0), lambda lora, p, tw: lora_files.write_comfy_native(lora, p / "sd3_native.safetensors", tw), False),
]
