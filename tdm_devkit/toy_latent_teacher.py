"""Tiny SDXL and Flux-dev teachers that have learned something, for the "student beats the teacher's own 4 steps"
check (tests/test_sdxl_flux_quality.py); random-weight twins have nothing to distil: their many-step and few-step
samples are equally arbitrary.

**The task.** Every latent element is independently +1 or −1 plus a little Gaussian noise (MODE_NOISE); the prompt
sets the share of +1 (POSITIVE_SHARE). Modes are what few-step sampling gets wrong: the first steps only see their
mean, so a teacher's 4-step samples land between or beyond the modes while its many-step samples reach them (with
the exact posterior, 4 DDIM steps on the SDXL grid give mean |x| 0.77 against 0.99 for 50 steps; Flux's 4 Euler
steps 0.81). Distribution matching has exactly this to fix.

**The teacher** is a tiny twin of the family (`twins_xl_flux`, and `twins` for SD3- and SD3.5-medium: ComfyUI layout,
real block structure; for SDXL the compact twin, one block per level) with all its weights trained on that task with the family's own objective,
through the same network call the trainer uses (the VP state and integer-valued timesteps for SDXL's ε-UNet, the flow state and σ for Flux; the conditioning built by
`conditioning.encode_prompts` from the test pack's tiny CLIP, so SDXL's `y` and Flux's `y`/`guidance` are what
sampling gives). Training is deterministic on the CPU and cached per task and settings (`TDM_TOY_CACHE`, else
~/.cache/comfyui-tdm), shared by both ComfyUI runtimes.

**What the trained twins learned** (measured with bench/pace.py): their 50-step element values are one near-Gaussian
bump per prompt with the data's mean and spread (SD3, SD3.5 and Flux twins: mean ±0.50, std 0.91 where the data's is
0.90, skewness within ±0.04; the SDXL twin's mean ±0.26, std 1.74), not the ±1 modes: their training steps teach them
each prompt's first two moments. Those figures are of their converged ODE (50 steps of DPM-Solver++(2M), within 0.3 %
of 250–500 steps); 50 Euler steps give the flow twins 2–3.5 % less spread. Their students are scored against that bump, so a student's distance to
it is mostly its mean and spread (pace's `<t>_moments_matched_to_floor`).

**The criterion** (`value_distance`): the 1-D Wasserstein distance between the element values of a set of 4-step
samples and of the teacher's many-step samples for the same prompt (the elements are independent in the task, so
their value distribution is what sampling must get right; pooled over every element it is measured precisely).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import comfy_runtime

comfy_runtime.bootstrap()

from safetensors.torch import load_file, save_file  # noqa: E402

from tdm_core.toy.cache_lock import training_lock  # noqa: E402

from . import twins, twins_xl_flux  # noqa: E402

PROMPTS = ("a cat", "a dog")
MODE_NOISE = 0.25
TEACHER_FORMAT_VERSION = 5  # bump when the training below changes in a way TeacherConfig does not capture


@dataclass(frozen=True)
class TeacherConfig:
    family: str  # "sdxl" | "flux"
    image_size: int = 32  # pixels; the latent is image_size / 8 on a side
    train_steps: int = 800  # SDXL: 200 (see for_family)
    batch_size: int = 64
    lr: float = 2e-3  # Flux's transformer: 1e-3 (see for_family)
    # SDXL: the ε loss weighted by 1/SNR up to this cap at high noise (an x0 loss there): ε errors at high noise are
    # x0 errors multiplied by √(1/SNR) (×14 at t = 999), which the first sampling steps pass on
    high_noise_weight: float = 20.0
    seed: int = 0

    @classmethod
    def for_family(cls, family: str) -> TeacherConfig:
        """The settings the quality test was tuned with (about 40 s each on 2 CPU cores). SDXL's compact UNet,
        started as latent-diffusion UNets are (`_trainable_start`), is a good enough teacher after 200 steps: its
        student removed 39 % of its 4-step distance, where the randomised start needed 800 steps for 26 % and failed
        at 400. Flux at 400 steps failed (19 %), so it keeps 800."""
        return cls(family, lr=1e-3) if family in ("flux", "sd3", "sd35") else cls(family, train_steps=200)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        channels = 4 if self.family == "sdxl" else (twins.SD3_LATENT_CHANNELS if self.family in ("sd3", "sd35")
                                                   else twins_xl_flux.FLUX_LATENT_CHANNELS)
        return (channels, self.image_size // 8, self.image_size // 8)

    def key(self) -> str:
        # Not the ComfyUI version: both runtimes build the same twin (same maths; the file holds the released
        # checkpoints' key names, see `_file_layout`), so one trained teacher serves the test runs on both.
        payload = json.dumps({"format": TEACHER_FORMAT_VERSION, "prompts": PROMPTS, "shares": POSITIVE_SHARE,
                              "mode_noise": MODE_NOISE, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# Each prompt's share of +1 elements: the prompt decides the image distribution, so the teacher has to read its
# conditioning (SDXL's cross-attention context and ADM vector `y`, Flux's text tokens, pooled `y` and guidance).
POSITIVE_SHARE = {"a cat": 0.75, "a dog": 0.25}


def sample_data(config: TeacherConfig, prompt_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents whose every element is independently +1 or −1 (the prompt's POSITIVE_SHARE of +1), plus a little
    Gaussian noise (MODE_NOISE) so the distribution has a density."""
    share = torch.tensor([POSITIVE_SHARE[p] for p in PROMPTS])[prompt_ids]
    shape = (len(prompt_ids), *config.latent_shape)
    uniform = torch.rand(shape, generator=generator)
    signs = (uniform < share[:, None, None, None]).float() * 2 - 1
    return signs + MODE_NOISE * torch.randn(shape, generator=generator)


def tiny_clip(family: str):
    """The test pack's tiny CLIP (what TDMTest_TinyCLIP gives the server's graphs)."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    module = sys.modules.get("tdm_test_pack")
    if module is None:  # the same module name tests/test_sdxl_flux.py loads it under
        path = Path(__file__).resolve().parents[1] / "tests" / "comfy_test_pack" / "__init__.py"
        spec = importlib.util.spec_from_file_location("tdm_test_pack", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tdm_test_pack"] = module
        spec.loader.exec_module(module)
    return module.TinyCLIP(family)


def _trainable_start(family: str, network: torch.nn.Module) -> None:
    """The initialisation each architecture is trained from, in place of the twin's randomised weights (chosen to
    expose key-mapping errors, they leave almost nothing of the latent in the output: a loss stuck at predicting the
    mean for hundreds of steps). Both start every residual branch at zero, so each block begins as the identity:
    - Flux, DiT-style adaLN-Zero: modulations and the output layer at zero, unit q/k norms;
    - SDXL, as latent-diffusion UNets are trained: zero second convolution of every ResBlock, zero output
      projection of every transformer and a zero output convolution, unit norms."""
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            if family in ("sd3", "sd35"):  # MMDiT, adaLN-Zero as Flux: modulations and the output layer at zero
                if name.startswith("final_layer.linear") or "adaLN_modulation." in name:
                    tensor.zero_()
                elif name.endswith(("ln_q.weight", "ln_k.weight")):
                    tensor.fill_(1.0)
            elif family == "flux":
                if name.startswith("final_layer.linear") or any(
                        part in name for part in ("_mod.lin.", "modulation.lin.", "adaLN_modulation.")):
                    tensor.zero_()
                elif name.endswith(("_norm.scale", "_norm.weight")):  # 0.3.75 says scale, newer ComfyUI weight
                    tensor.fill_(1.0)
            elif name.startswith("out.2.") or ".out_layers.3." in name or ".proj_out." in name:
                tensor.zero_()
            elif "norm" in name.split(".")[-2] or ".in_layers.0." in name or ".out_layers.0." in name \
                    or name.startswith("out.0."):
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)


def train_teacher(config: TeacherConfig, log=print) -> dict[str, torch.Tensor]:
    """The twin's ComfyUI-layout state dict after training on the task, on one CPU thread: deterministic, and the
    same file whatever thread count the process runs with (the summation order of a reduction depends on it, and the
    quality check's figures moved from 45 % to 35 % between teachers trained on 2 threads and on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_teacher(config, log)
    finally:
        torch.set_num_threads(threads)


def _train_teacher(config: TeacherConfig, log) -> dict[str, torch.Tensor]:
    import importlib  # noqa: PLC0415

    pack = comfy_runtime.load_pack().__name__
    conditioning = importlib.import_module(f"{pack}.nodes.conditioning")
    family_adapters = importlib.import_module(f"{pack}.nodes.family_adapters")
    torch.manual_seed(config.seed)
    model = teacher_twin(config.family, config.seed)
    conds = conditioning.encode_prompts(tiny_clip(config.family), list(PROMPTS), "", model=model,
                                         family=config.family, latent_shape=config.latent_shape)
    network = model.model.diffusion_model
    with torch.inference_mode(False):
        network = network.train()
        family_adapters.adapter(config.family).prepare_for_training(network)  # as the trainer does (Flux's in-place adds)
        weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(weights)  # plain tensors (the twin may have been built under inference mode)
        _trainable_start(config.family, network)
        for p in network.parameters():
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.train_steps, eta_min=config.lr * 0.02)
        # ᾱ_t from ComfyUI's own discrete schedule (it stores σ_t = sqrt((1 − ᾱ_t) / ᾱ_t))
        sigmas = model.model.model_sampling.sigmas.double()
        alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()
        generator = torch.Generator().manual_seed(config.seed)
        started = time.monotonic()
        for step in range(config.train_steps):
            prompt_ids = torch.randint(0, len(PROMPTS), (config.batch_size,), generator=generator)
            x0 = sample_data(config, prompt_ids, generator)
            noise = torch.randn(x0.shape, generator=generator)
            batch = {key: torch.cat([conds[PROMPTS[i]][key] for i in prompt_ids.tolist()])
                     for key in conds[PROMPTS[0]]}
            extra = {}
            if config.family == "sdxl":
                t = torch.randint(0, 1000, (config.batch_size,), generator=generator)
                a = alphas_cumprod[t].sqrt()[:, None, None, None]
                s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
                x_t, model_t, target = a * x0 + s * noise, t.float(), noise
                weight = ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).clamp(1.0, config.high_noise_weight)
            else:
                sigma = torch.rand((config.batch_size,), generator=generator)
                s = sigma[:, None, None, None]
                # Flux is fed σ (and its guidance input), SD3 σ·1000 (its model_sampling's multiplier)
                feed = sigma * float(getattr(model.model.model_sampling, "multiplier", 1.0))
                x_t, model_t, target = (1 - s) * x0 + s * noise, feed, noise - x0
                weight = torch.ones(config.batch_size)
                if config.family == "flux":
                    extra["guidance"] = batch["guidance"].float()
            out = network(x_t, model_t, context=batch["context"], y=batch["y"], **extra)
            loss = ((out.float() - target) ** 2).mean(dim=(1, 2, 3)).mul(weight).sum() / weight.sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 100 == 0 or step == config.train_steps - 1:
                log(f"toy {config.family} teacher step {step}: loss {loss.item():.4f} "
                    f"({time.monotonic() - started:.0f} s)")
        network.eval()
        return _file_layout(config.family, network.state_dict())


def _file_layout(family: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained weights under the key names of the released checkpoints, so that one cached file loads on every
    ComfyUI: Flux's q/k RMSNorm gains are `*_norm.scale` in BFL's files and in 0.3.75's Flux module; newer ComfyUI
    names the parameter `weight` and renames on load (`process_unet_state_dict`, which `teacher_model` applies as
    ComfyUI does to every Flux file)."""
    def file_key(key: str) -> str:
        return key[:-len("weight")] + "scale" if family == "flux" and key.endswith("_norm.weight") else key
    return {file_key(k): v.detach().clone().contiguous() for k, v in state_dict.items()}


def cache_dir() -> Path:
    env = os.environ.get("TDM_TOY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "comfyui-tdm"


def teacher_file(config: TeacherConfig, log=print) -> Path:
    """The trained teacher's weights (ComfyUI layout, safetensors), trained once and cached."""
    path = cache_dir() / f"toy_latent_{config.family}_{config.key()}.safetensors"
    with training_lock(path):  # a parallel test worker that needs the same teacher waits for this one
        if not path.is_file():
            weights = train_teacher(config, log)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(weights, str(tmp), metadata={"config": json.dumps(asdict(config))})
            os.replace(tmp, path)
    return path


def teacher_twin(family: str, seed: int = 0):
    """The ComfyUI MODEL a toy teacher trains from and loads into: the Flux twin, or the compact SDXL twin (same
    layout at a quarter of the parameters, twins_xl_flux.SDXL_COMPACT_UNET_CONFIG: the teacher and every sampling
    pass of the quality check cost half as much)."""
    if family == "sdxl":
        return twins_xl_flux.sdxl_twin(seed, compact=True).comfy
    if family in ("sd3", "sd35"):  # SD3.5-medium: dual attention in block 0, RMS q/k norms
        return twins.sd3_twin(seed, sd35=family == "sd35").comfy
    return twins_xl_flux.flux_twin(seed).comfy


def teacher_model(family: str, path: str | os.PathLike, seed: int = 0):
    """A trained `teacher_file` as a ComfyUI MODEL (the test pack's TDMTest_TinyModel with `weights_file`)."""
    model = teacher_twin(family, seed)
    weights = model.model.model_config.process_unet_state_dict(load_file(str(path)))  # the runtime's key names
    model.model.diffusion_model.load_state_dict(weights, strict=True)
    return model


def value_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The 1-D Wasserstein-1 distance between the distributions of the element values of two equally sized sample
    sets: the mean absolute difference of their sorted values."""
    a, b = a.flatten().double().sort().values, b.flatten().double().sort().values
    if a.shape != b.shape:
        raise ValueError(f"value_distance needs equally many values, got {a.numel()} and {b.numel()}")
    return float((a - b).abs().mean())
