"""TDM 4-step sampling vs the teachers' own recipes: NFE and wall time, measured in one run; prints ONE JSON line.

    .venv/bin/python bench/sampling.py [--repeats 3] [--dtypes float32,bfloat16]   (CUDA when available, else CPU)

- sd3 / sd15: ComfyUI sampling (TDM KSampler node vs SamplerCustom with the teacher's steps and CFG, negative
  prompt batched with the positive as ComfyUI does) on random-weight models with the real block layouts at widths
  where the network, not the sampler loop, dominates (sizes in "models").
- cogvideox: tdm_core's v-DDIM at the trained timesteps vs diffusers' CogVideoXDDIMScheduler loop (50 steps, CFG 6)
  on a diffusers CogVideoXTransformer3DModel. `bench_cogvideox` is the hook to switch to the video node path once
  the video issue lands.
- overhead_vs_euler: (TDM deterministic sampler − ComfyUI euler) / euler at identical sigmas, CFG 1.
NFE is counted (forward calls × batch / images), not assumed. Times are the minimum over repeats.
Each dtype is measured at the same widths in the same run: float32 at the top level (as before), bfloat16 under
"bf16": bf16 weights loaded the way ComfyUI loads them on this device, which also picks the compute dtype (bf16 on a
bf16-capable GPU; on a CPU it casts bf16 weights to float32 per layer, its manual-cast path); the diffusers-backed
CogVideoX pipeline computes in bf16 everywhere. Each entry carries "dtype" (weights) and "compute_dtype".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdm_devkit import comfy_runtime  # noqa: E402

SEED = 0
TEXT_TOKENS = 16


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def race(fns, repeats):
    """Minimum wall time of each function over `repeats` interleaved rounds (a load burst on a shared machine then
    hits every contender alike). Call each once before: kernel selection and allocations are not timed."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


class CountNFE:
    """Model evaluations per image: forward calls weighted by their batch, divided by the number of images."""

    def __init__(self, module, images):
        self.images, self.total = images, 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.total += x.shape[0]

    def nfe(self):
        self.handle.remove()
        return self.total // self.images


def compare_recipes(label, tdm, teacher, network, repeats, **extra) -> dict:
    """NFE of each recipe (counted on `network`), then their wall times raced in the same run; the goal is
    0.9 × the NFE ratio (issue: speed-up ≥ 0.9 × NFE ratio)."""
    counter = CountNFE(network, 1)
    tdm()
    nfe_tdm = counter.nfe()
    counter = CountNFE(network, 1)
    teacher()
    nfe_teacher = counter.nfe()
    t_tdm, t_teacher = race([tdm, teacher], repeats)
    log(f"{label}: tdm {t_tdm:.3f}s teacher {t_teacher:.3f}s")
    result = {"nfe_tdm": nfe_tdm, "nfe_teacher": nfe_teacher, "nfe_ratio": round(nfe_teacher / nfe_tdm, 3),
              "time_tdm_s": round(t_tdm, 4), "time_teacher_s": round(t_teacher, 4),
              "speedup": round(t_teacher / t_tdm, 3), "goal": round(0.9 * nfe_teacher / nfe_tdm, 3), **extra}
    result["meets_goal"] = result["speedup"] >= result["goal"]
    return result


def params(module):
    return sum(p.numel() for p in module.parameters())


def comfy_family(family, sampling, repeats, dtype=torch.float32):
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models

    from tdm_core import presets
    from tdm_devkit import twins

    preset = presets.get_preset("sd3" if family == "sd3" else "dreamshaper")
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        depth = 8
        config = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                      attention_head_dim=64, num_attention_heads=depth, joint_attention_dim=256,
                      caption_projection_dim=64 * depth, pooled_projection_dim=128, pos_embed_max_size=32)
        transformer = twins.randomise_(SD3Transformer2DModel(**config), 0)
        state_dict = {k: v.clone() for k, v in transformer.state_dict().items()}
        options = {} if dtype == torch.float32 else {"dtype": dtype}  # ComfyUI picks the compute dtype
        model = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=options)
        context, pooled = torch.randn(1, TEXT_TOKENS, 256), torch.randn(1, 128)
        cond = [[context, {"pooled_output": pooled}]]
        uncond = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
        latent = torch.zeros(1, 16, 64, 64)  # 1024 image tokens: compute, not dispatch, dominates
        size = {"arch": "MMDiT (SD3 layout)", "depth": depth, "hidden": 64 * depth, "params": params(transformer),
                "latent": list(latent.shape)}
    else:
        unet_config = dict(twins.SD15_TINY_UNET_CONFIG, model_channels=128, context_dim=256)
        model_config = comfy.supported_models.SD15(unet_config)
        # the compute dtype ComfyUI's loaders pick for these weights on this device (None: the weights' own)
        model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
            dtype, comfy.model_management.get_torch_device()))
        base = model_config.get_model({})
        twins.randomise_(base.diffusion_model, 0)
        model = twins._patcher(base)
        cond = [[torch.randn(1, TEXT_TOKENS, 256), {}]]
        uncond = [[torch.zeros(1, TEXT_TOKENS, 256), {}]]
        latent = torch.zeros(1, 4, 64, 64)
        size = {"arch": "UNet (SD1.5 layout)", "model_channels": 128, "context_dim": 256,
                "params": params(base.diffusion_model), "latent": list(latent.shape)}
    model_sampling = model.get_model_object("model_sampling")
    noise = comfy.sample.prepare_noise(latent, SEED)
    diffusion_model = model.model.diffusion_model

    def tdm():
        sampling.TDMKSampler.execute(model, cond, {"samples": latent}, preset.name, preset.steps, SEED)

    teacher_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", preset.teacher.steps).cpu()

    def teacher():
        comfy.sample.sample_custom(model, noise, preset.teacher.cfg, comfy.samplers.sampler_object("euler"),
                                   teacher_sigmas, cond, uncond, latent, disable_pbar=True, seed=SEED)

    result = compare_recipes(f"{family} {dtype}", tdm, teacher, diffusion_model, repeats,
                             dtype=str(model.model.get_dtype()).replace("torch.", ""),
                             compute_dtype=str(model.model.manual_cast_dtype or model.model.get_dtype()).replace(
                                 "torch.", ""))
    return result, size, (model, cond, latent, noise)


def overhead_vs_euler(sampling, model, cond, latent, noise, repeats):
    """Same model, same TDM sigmas, CFG 1: the TDM deterministic (ddim) sampler vs ComfyUI's euler."""
    import comfy.sample
    import comfy.samplers

    sigmas = sampling.tdm_sigmas(model, "sd3", 8)
    tdm_sampler = sampling.tdm_sampler("ddim", 0.0, "integer", "unit")
    euler = comfy.samplers.sampler_object("euler")

    def run(sampler):
        return lambda: comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, [], latent,
                                                  disable_pbar=True, seed=SEED)

    run(tdm_sampler)()
    run(euler)()
    t_tdm, t_euler = race([run(tdm_sampler), run(euler)], 4 * repeats)
    log(f"overhead: tdm {t_tdm:.4f}s euler {t_euler:.4f}s")
    return round((t_tdm - t_euler) / t_euler, 4)


def bench_cogvideox(repeats, dtype=torch.float32):
    """The video node path (tdm_core.cogvideox.sample_latents, what TDM CogVideoX Sampler runs): TDM at the trained
    timesteps, 4 NFE at CFG 1, vs the CogVideoX-2b recipe through the same loop, 50 trailing steps at CFG 6 (100 NFE,
    bit-identical to CogVideoXPipeline in the tests). Text encoding is cached, as in the node; decoding is excluded."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from tdm_core import cogvideox, presets, schedules
    from tdm_devkit import cogvideox_tiny, twins

    preset = presets.get_preset("cogvideox")
    components = cogvideox_tiny.build_tiny_cogvideox(0)
    heads, head_dim, layers, latent_frames = 8, 32, 4, 5
    text_dim = components["text_encoder"].config.d_model
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16, time_embed_dim=128,
        text_embed_dim=text_dim, num_layers=layers, sample_width=16, sample_height=16, sample_frames=13,
        max_text_seq_length=cogvideox_tiny.MAX_TEXT_SEQ_LENGTH).eval()
    components["transformer"] = twins.randomise_(transformer, 0)
    pipe = CogVideoXPipeline(**components).to(comfy_runtime_device(), dtype)
    pipe.set_progress_bar_config(disable=True)
    frames, size_px = (latent_frames - 1) * 4 + 1, 16 * pipe.vae_scale_factor_spatial
    prompt = "a red fox trotting through fresh snow"
    tdm_grid = schedules.grid_timesteps(preset.grid, preset.steps)
    teacher_grid = cogvideox.sampling_timesteps("trailing", preset.teacher.steps)

    def tdm():
        cogvideox.sample_latents(pipe, prompt, "", frames, size_px, size_px, tdm_grid, preset.cfg, SEED)

    def teacher():
        cogvideox.sample_latents(pipe, prompt, "", frames, size_px, size_px, teacher_grid, preset.teacher.cfg, SEED)

    result = compare_recipes(f"cogvideox {dtype}", tdm, teacher, pipe.transformer, repeats,
                             path="tdm_core.cogvideox.sample_latents (TDM CogVideoX Sampler)",
                             dtype=str(pipe.transformer.dtype).replace("torch.", ""),
                             compute_dtype=str(pipe.transformer.dtype).replace("torch.", ""))
    size = {"arch": "CogVideoXTransformer3DModel", "heads": heads, "head_dim": head_dim, "layers": layers,
            "params": params(pipe.transformer), "latent": [1, latent_frames, 16, 16, 16],
            "text_tokens": cogvideox_tiny.MAX_TEXT_SEQ_LENGTH}
    return result, size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated: float32 (the top-level figures) and/or bfloat16 (the 'bf16' section)")
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - {"float32", "bfloat16"})
    if unknown:
        parser.error(f"unknown dtypes {unknown}; use float32 and/or bfloat16")
    comfy_runtime.bootstrap_on_device()
    sampling = comfy_runtime.load_pack().nodes.sampling
    torch.set_grad_enabled(False)
    report = {"bench": "sampling", "device": str(comfy_runtime_device()), "torch_threads": torch.get_num_threads()}
    models = {}
    log(f"device {report['device']}, {torch.get_num_threads()} threads")
    if "float32" in dtypes:
        report["dtype"] = "float32"
        report["sd3"], models["sd3"], sd3_inputs = comfy_family("sd3", sampling, args.repeats)
        report["sd15"], models["sd15"], _ = comfy_family("sd15", sampling, args.repeats)
        report["cogvideox"], models["cogvideox"] = bench_cogvideox(args.repeats)
        report["overhead_vs_euler"] = overhead_vs_euler(sampling, *sd3_inputs, repeats=args.repeats)
        report["overhead_goal"] = 0.03
    if "bfloat16" in dtypes:
        half = {"dtype": "bfloat16"}
        half["sd3"], size, _ = comfy_family("sd3", sampling, args.repeats, torch.bfloat16)
        models.setdefault("sd3", size)
        half["sd15"], size, _ = comfy_family("sd15", sampling, args.repeats, torch.bfloat16)
        models.setdefault("sd15", size)
        half["cogvideox"], size = bench_cogvideox(args.repeats, torch.bfloat16)
        models.setdefault("cogvideox", size)
        report["bf16"] = half
    report["models"] = models  # the same widths in every dtype
    print(json.dumps(report))


def comfy_runtime_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


if __name__ == "__main__":
    main()
