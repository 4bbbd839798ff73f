"""The released TDM LoRAs and how each must be sampled: the one source of truth for every model preset.

Nodes (preset combos, strength "auto"), tests, workflows and the README table all read these entries; a number
written anywhere else is a bug. Figures and sources: `docs/tdm_method.md` §3 (the official
TDM README recipes and diffusers 0.42.1 scheduler configs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import families


@dataclass(frozen=True)
class TeacherRecipe:
    """The base model's own many-step recipe, for speed and quality comparisons."""

    steps: int
    cfg: float

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg > 1.0 else 1)


@dataclass(frozen=True)
class ModelPreset:
    name: str  # stable id, stored in workflows and LoRA metadata: never rename
    display_name: str
    family: str  # the tdm_core.families name of the model family the LoRA belongs to
    parametrisation: str  # "flow" (rectified flow velocity), "eps", "v"
    steps: int
    grid: str  # name of the timestep grid in tdm_core.schedules
    solver: str  # name of the solver in tdm_core.solvers
    lora_strength: float
    shift: float | None = None  # flow shift (SD3/SD3.5); None where it does not apply or (Flux) depends on the size
    cfg: float = 1.0  # every released TDM LoRA samples without CFG
    teacher: TeacherRecipe | None = None
    lora_source: str = ""  # where users download the LoRA ("" where none is released: distil it with TDM Distill)
    lora_file: str = ""
    base_model_source: str = ""
    base_model_file: str = ""  # the name the example workflows load, in ComfyUI's `base_model_folder`
    base_model_folder: str = "checkpoints"
    # Direct file links (Hugging Face "resolve" URLs): the example workflows' loader nodes carry them as
    # `properties.models`, which newer frontends offer to download when the file is missing, and pyproject.toml lists
    # them for the registry. Empty where there is no single file to fetch (a diffusers folder). The file is saved
    # under lora_file / base_model_file, whatever its name in the repository.
    lora_url: str = ""
    base_model_url: str = ""
    # Hugging Face makes the user accept a licence before the base model downloads (log in, then "Agree").
    base_model_gated: bool = False
    # Where base_model_url is empty: why there is no direct link, and where the single file comes from instead.
    base_model_how: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # The solver for students TDM Distill makes for this preset's family, where it is not `solver` (the release's):
    # chosen by measuring students against their teacher (bench/student_solver.py). TDM Distill records it in the
    # LoRA (`tdm.solver`) and `auto` follows the record.
    student_solver: str = ""
    # The official recipe this preset reproduces, and its two conventions where ComfyUI's defaults differ from it
    # (on VP models both conventions coincide with ComfyUI's, so they only matter for flow models):
    # - model_timesteps "integer": the model is given the scheduler's integer timesteps (diffusers casts σ·1000 to
    #   int64), while the solver keeps the float σ; ComfyUI would pass σ·1000 as a float ("float").
    # - initial_noise "unit": a pure-noise start is plain N(0, I) noise labelled σ_0, as diffusers' pipelines and the
    #   TDM rollout start; ComfyUI scales it by σ_0 for flow models ("scaled").
    reference: str = ""
    # img2img (`denoise` d of n steps) runs the tail of the same grid, as the base model's diffusers img2img pipeline
    # counts it (`get_timesteps`): "floor" runs int(n·d) steps (StableDiffusionImg2ImgPipeline, CogVideoX
    # video-to-video); "sd3_pipeline" runs n − int(n − n·d) (StableDiffusion3Img2ImgPipeline: 3 of 4 at d = 0.6, not 2).
    img2img_steps: str = "floor"
    model_timesteps: str = "integer"
    initial_noise: str = "unit"

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg > 1.0 else 1)


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="sd3",
            display_name="SD3-medium (TDM_sd3_lora)",
            family=families.SD3.name,
            parametrisation="flow",
            steps=4,
            grid="flow_shift",
            shift=6.0,
            solver="flow_dpmpp_2m",
            # The official README marks this "IMPORTANT": the LoRA is applied at 1/8.
            lora_strength=0.125,
            teacher=TeacherRecipe(steps=28, cfg=7.0),
            reference="diffusers DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', "
            "flow_shift=6, algorithm_type='dpmsolver++', solver_order=2), integer timesteps, x_T = noise",
            lora_source="https://huggingface.co/Luo-Yihong/TDM_sd3_lora",
            lora_file="tdm_sd3.safetensors",
            base_model_source="https://huggingface.co/stabilityai/stable-diffusion-3-medium",
            base_model_file="sd3_medium_incl_clips_t5xxlfp16.safetensors",
            # diffusers' default LoRA file name: the official README loads the repository without a weight_name.
            lora_url="https://huggingface.co/Luo-Yihong/TDM_sd3_lora/resolve/main/pytorch_lora_weights.safetensors",
            base_model_url="https://huggingface.co/stabilityai/stable-diffusion-3-medium/resolve/main/"
                           "sd3_medium_incl_clips_t5xxlfp16.safetensors",
            base_model_gated=True,
            img2img_steps="sd3_pipeline",
        ),
        ModelPreset(
            name="sd35",
            display_name="SD3.5-medium (TDM_sd3-5_lora)",
            family=families.SD35.name,
            parametrisation="flow",
            steps=4,
            grid="flow_shift",
            shift=6.0,
            solver="flow_dpmpp_2m",
            # Unpublished for SD3.5; the SD3 recipe is the documented starting point (verify on the real LoRA).
            lora_strength=0.125,
            teacher=TeacherRecipe(steps=28, cfg=7.0),
            reference="as sd3 (diffusers flow DPM-Solver++(2M), flow_shift 6)",
            lora_source="https://huggingface.co/Luo-Yihong/TDM_sd3-5_lora",
            lora_file="tdm_sd35.safetensors",
            # ComfyUI's single-file repackaging with the text encoders included (the official repo ships them apart).
            base_model_source="https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8",
            base_model_file="sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
            lora_url="https://huggingface.co/Luo-Yihong/TDM_sd3-5_lora/resolve/main/pytorch_lora_weights.safetensors",
            base_model_url="https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
                           "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
            notes="Strength and shift follow the SD3 release; the SD3.5 model card does not state them.",
            img2img_steps="sd3_pipeline",
        ),
        ModelPreset(
            name="dreamshaper",
            display_name="Dreamshaper-7 / SD1.5 (TDM_dreamshaper_LoRA)",
            family=families.SD15.name,
            parametrisation="eps",
            steps=4,
            grid="sd15_linspace",
            solver="dpmpp_2m",
            lora_strength=1.0,
            teacher=TeacherRecipe(steps=25, cfg=7.5),
            reference="diffusers DPMSolverMultistepScheduler with the SD1.5 DDPM config (scaled_linear 0.00085-0.012, "
            "epsilon, dpmsolver++, order 2, timestep_spacing 'linspace')",
            lora_source="https://huggingface.co/Luo-Yihong/TDM_dreamshaper_LoRA",
            lora_file="tdm_dreamshaper.pt",
            # Lykon/dreamshaper-7 is the diffusers release; ComfyUI loads the single-file DreamShaper 7 checkpoint.
            base_model_source="https://huggingface.co/Lykon/dreamshaper-7",
            base_model_file="dreamshaper_7.safetensors",
            base_model_how=("the model page holds the diffusers folder, not one file: get DreamShaper 7's single-file "
                            "checkpoint from its author's page, https://civitai.com/models/4384/dreamshaper (version "
                            "7; the page the Hugging Face README links), and save it under this name"),
            lora_url="https://huggingface.co/Luo-Yihong/TDM_dreamshaper_LoRA/resolve/main/tdm_dreamshaper.pt",
            # An ε student trained with the DDIM rollout is closer to its teacher sampled that way: on the digits toy
            # (this grid, 500 iterations, 3 seeds) FD to the teacher's 50 steps 0.059-0.068 with DDIM against
            # 0.071-0.095 with the release's DPM-Solver++(2M).
            student_solver="ddim",
        ),
        ModelPreset(
            name="cogvideox",
            display_name="CogVideoX-2B (TDM_CogVideoX-2B_LoRA)",
            family=families.COGVIDEOX.name,
            parametrisation="v",
            steps=4,
            # The LoRA was trained at 999/856/665/399; the official README's uniform (trailing) grid "may cause
            # inferior results", so the trained grid is the default.
            grid="cogvideox_trained",
            solver="ddim_v",
            lora_strength=1.0,
            teacher=TeacherRecipe(steps=50, cfg=6.0),
            reference="v-prediction DDIM (CogVideoXDDIMScheduler alphas_cumprod: SNR shift 3, zero terminal SNR) at the "
            "trained timesteps",
            lora_source="https://huggingface.co/Luo-Yihong/TDM_CogVideoX-2B_LoRA",
            lora_file="tdm_cogvideox_2b.safetensors",
            base_model_source="https://huggingface.co/THUDM/CogVideoX-2b",
            base_model_file="CogVideoX-2b",  # the whole diffusers repository, as a folder
            base_model_folder="diffusers",
            lora_url="https://huggingface.co/Luo-Yihong/TDM_CogVideoX-2B_LoRA/resolve/main/"
                     "pytorch_lora_weights.safetensors",
            # Newer ComfyUI (upstream, 2026) runs CogVideoX natively from its core loaders; the files it loads,
            # by model folder: (file name, where it comes from). Its UNETLoader detects CogVideoX only by native
            # keys (blocks.N.*), and detects the 2B's sin-cos positions only when the file carries
            # patch_embed.pos_embedding (without it, it assumes the 5B's rotary positions).
            # Nobody publishes the 2B's transformer in that layout: tdm_core.cogvideox_convert writes it from the
            # diffusers folder the other CogVideoX workflow uses. The diffusers VAE file has ComfyUI's key names.
            extra={"native_files": {
                "diffusion_models": ("cogvideox_2b.safetensors", "make it from the CogVideoX-2b diffusers folder "
                                     "(models/diffusers/CogVideoX-2b, https://huggingface.co/THUDM/CogVideoX-2b): in "
                                     "this pack's folder run `python -m tdm_core.cogvideox_convert "
                                     "../../models/diffusers/CogVideoX-2b "
                                     "../../models/diffusion_models/cogvideox_2b.safetensors` with ComfyUI's Python"),
                "text_encoders": ("t5xxl_fp16.safetensors",
                                  "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                                  "t5xxl_fp16.safetensors"),
                "vae": ("cogvideox_vae.safetensors", "https://huggingface.co/THUDM/CogVideoX-2b/resolve/main/vae/"
                                                     "diffusion_pytorch_model.safetensors"),
            }},
        ),
        # No TDM LoRA is released for SDXL or Flux: these presets sample students distilled by TDM Distill, which
        # trains the student on exactly this grid (the trainer's rollout is the deterministic DDIM step on it).
        ModelPreset(
            name="sdxl",
            display_name="SDXL (student distilled with TDM Distill)",
            family=families.SDXL.name,
            parametrisation="eps",
            steps=4,
            # SDXL has SD1.5's noise schedule (ε, scaled-linear betas 0.00085–0.012), so the SD1.5 release's grid
            # (999, 749, 500, 250) applies unchanged. The solver is the TDM student's own deterministic step (DDIM):
            # the paper's student *is* a K-step DDIM sampler, and TDM Distill rolls it out with that step on this
            # grid, so sampling it the same way reproduces the trajectory it was trained on.
            grid="sd15_linspace",
            solver="ddim",
            lora_strength=1.0,
            teacher=TeacherRecipe(steps=25, cfg=7.5),
            reference="diffusers DPMSolverMultistepScheduler with the SDXL/SD1.5 DDPM config (scaled_linear "
            "0.00085-0.012, epsilon, timestep_spacing 'linspace', final_sigmas_type 'zero') at solver_order=1, "
            "which is DDIM (η = 0)",
            base_model_source="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0",
            base_model_file="sd_xl_base_1.0.safetensors",
            base_model_url="https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                           "sd_xl_base_1.0.safetensors",
            lora_file="tdm_sdxl_student.safetensors",  # the name the example workflow distils into
            notes="No released TDM LoRA: distil one with TDM Distill (prompts only), then sample it here.",
        ),
        ModelPreset(
            name="flux",
            display_name="Flux-dev (student distilled with TDM Distill)",
            family=families.FLUX.name,
            parametrisation="flow",
            steps=4,
            # Flux's own schedule: FluxPipeline's u = linspace(1, 1/n, n) with the exponential time shift of μ,
            # μ from the latent size being sampled (schedules.flux_mu), so `shift` is None here.
            grid="flux_shift",
            # The student is trained with the flow DDIM step (Flux's Euler step, x' = x + (σ' − σ) v), but is sampled
            # closer to its teacher by the flow DPM-Solver++(2M) on the same grid: on the Flux toy latent teacher
            # (bench/student_solver.py) its W1 distance to the teacher's 50 steps fell by 25–30 % on every prompt,
            # training seed and length measured (4 seeds at 200 iterations, 1 at 600).
            solver="flow_dpmpp_2m",
            lora_strength=1.0,
            # Flux-dev is guidance-distilled: its teacher recipe is one pass with the guidance embedding (3.5), no CFG.
            teacher=TeacherRecipe(steps=28, cfg=1.0),
            reference="the grid of diffusers FluxPipeline: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting, "
            "base_shift 0.5, max_shift 1.15, exponential), σ = linspace(1, 1/n, n) shifted by μ(image tokens), float "
            "timesteps σ; stepped by DPMSolverMultistepScheduler's flow DPM-Solver++(2M) on it",
            # The Flux transformer is given σ as a float (diffusers: timestep / 1000), never an integer timestep.
            model_timesteps="float",
            base_model_source="https://huggingface.co/black-forest-labs/FLUX.1-dev",
            base_model_file="flux1-dev.safetensors",
            base_model_folder="diffusion_models",
            # The official repository is gated; ComfyUI's own Flux-dev templates (comfyui-workflow-templates'
            # flux_dev_full_text_to_image) download the same files from Comfy-Org's ungated mirrors, as do these.
            # The FLUX.1-dev licence (model page) applies either way.
            base_model_url="https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
            lora_file="tdm_flux_student.safetensors",
            notes="No released TDM LoRA: distil one with TDM Distill from Flux-dev (guidance-distilled; the "
            "conditioning's guidance, FluxGuidance 3.5 by default, is the teacher's guidance), then sample it here "
            "with the same guidance. Flux-schnell is already a few-step model.",
            extra={"guidance": 3.5,
                   # Loaded from split files (UNETLoader + DualCLIPLoader + VAELoader): the other files the diffusion
                   # model needs, as (model folder, file name, direct link): ComfyUI's repackaged text encoders
                   # and the Flux VAE (ae.safetensors) from the ungated mirror core's Flux templates use.
                   "split_files": (
                       ("text_encoders", "clip_l.safetensors",
                        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
                       ("text_encoders", "t5xxl_fp16.safetensors",
                        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
                       ("vae", "ae.safetensors",
                        "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/"
                        "ae.safetensors"),
                   )},
        ),
        # No TDM LoRA is released for Wan 2.1 either: this preset samples TDM Distill's Wan 2.1 text-to-video students
        # (1.3B and 14B alike: one layout, one schedule).
        ModelPreset(
            name="wan21",
            display_name="Wan 2.1 T2V 1.3B / 14B (student distilled with TDM Distill)",
            family=families.WAN21.name,
            parametrisation="flow",
            steps=4,
            # The shift: ComfyUI's WAN21_T2V samples with shift 8.0 (its `sampling_settings`, the MODEL's
            # model_sampling, the table TDM Distill's fake score trains on), which is also the Wan2.1 README's advice
            # for T2V-1.3B ("--sample_shift 8 to 12"). diffusers' WanPipeline has no shift of its own: it takes its
            # scheduler's `flow_shift` (UniPCMultistepScheduler; its example sets 3.0 for 480p, 5.0 for 720p, the
            # Wan-AI generate.py default being 5.0). The preset follows the teacher as ComfyUI users sample it (8),
            # as the SD3 release chose a shift above its base model's default for 4 steps (6 against 3): at 4 steps
            # it puts σ at .9999, .960, .889, .727. The grid is diffusers' flow DPM-Solver grid (flow_shift), which
            # the trainer and TDM Scheduler share; diffusers' UniPC builds its flow grid from linspace(1, 1/N, n)
            # instead, a few thousandths apart, which only matters for comparing with that scheduler.
            grid="flow_shift",
            shift=8.0,
            # The student's own step: TDM Distill rolls it out with the flow DDIM (Euler) step on this grid; no
            # measured better solver yet (Flux's flow_dpmpp_2m was measured on its toy teacher, not on Wan).
            solver="ddim",
            lora_strength=1.0,
            # The base recipe: Wan2.1 generate.py's t2v defaults (50 steps, guide scale 5.0), which diffusers'
            # WanPipeline also defaults to.
            teacher=TeacherRecipe(steps=50, cfg=5.0),
            reference="diffusers DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', "
            "flow_shift=8, solver_order=1), i.e. the flow DDIM (Euler) step, integer timesteps, x_T = noise",
            base_model_source="https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged",
            base_model_file="wan2.1_t2v_1.3B_fp16.safetensors",
            base_model_folder="diffusion_models",
            base_model_url="https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
                           "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
            lora_file="tdm_wan21_student.safetensors",
            notes="No released TDM LoRA: distil one with TDM Distill from Wan 2.1 text-to-video (1.3B or 14B; the "
            "negative prompt is the teacher's CFG unconditional), then sample it here. Image-to-video, VACE, Fun, "
            "camera and Wan 2.2 models are not supported.",
            extra={"split_files": (
                ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                 "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
                 "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                ("vae", "wan_2.1_vae.safetensors",
                 "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/"
                 "wan_2.1_vae.safetensors"),
            )},
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown TDM preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def presets_for_family(family: str) -> list[ModelPreset]:
    return [p for p in PRESETS.values() if p.family == family]


def presets_for_parametrisation(parametrisation: str) -> list[ModelPreset]:
    return [p for p in PRESETS.values() if p.parametrisation == parametrisation]


def student_solver(preset_name: str, parametrisation: str) -> str:
    """The solver a student that TDM Distill trained on `preset_name`'s grid is sampled with: the preset's
    `student_solver`, else its solver; for a grid of no preset, the step the student was trained with."""
    preset = PRESETS.get(preset_name)
    if preset is not None:
        return preset.student_solver or preset.solver
    return "ddim_v" if parametrisation == "v" else "ddim"


def solver_for_parametrisation(parametrisation: str) -> str:
    """The solver of the released recipe for this parametrisation: the TDM sampler's "auto" choice."""
    matching = presets_for_parametrisation(parametrisation)
    if not matching:
        known = sorted({p.parametrisation for p in PRESETS.values()})
        raise KeyError(f"no TDM preset for {parametrisation!r} models; TDM recipes exist for {', '.join(known)}")
    return matching[0].solver


def where_to_get(name: str) -> str | None:
    """For a file or folder name a workflow of this pack loads (a preset's `lora_file` or `base_model_file`), where
    to get it, in a sentence for an error message; None for any other name."""
    for preset in PRESETS.values():
        if name == preset.lora_file:
            if preset.lora_url:
                return (f"It is the {preset.display_name} LoRA: download {preset.lora_url} and save it as "
                        f"models/loras/{preset.lora_file}")
            return (f"It is the {preset.display_name} LoRA that the example workflow's TDM Distill writes: run "
                    "that workflow (or TDM Distill) to make it")
        if name == preset.base_model_file:
            gated = " (log in and accept its licence first)" if preset.base_model_gated else ""
            if preset.base_model_url:
                return (f"It is the {preset.display_name} base model: download {preset.base_model_url}{gated} and "
                        f"save it as models/{preset.base_model_folder}/{preset.base_model_file}")
            if preset.base_model_how:  # a single file with no direct link (the page holds a diffusers folder)
                return f"It is the {preset.display_name} base model: {preset.base_model_how}"
            return (f"It is the {preset.display_name} base model: download the whole {preset.base_model_source} "
                    f"repository{gated} into models/{preset.base_model_folder}/{preset.base_model_file}/")
    return None
