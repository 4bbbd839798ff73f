"""Which solver samples a TDM student closest to its teacher: the DDIM step it was trained with, or DPM-Solver++(2M)
on the same grid. Prints ONE JSON line.

    .venv/bin/python bench/student_solver.py [--seeds 1] [--families digits,sdxl,flux,sd3,sd35]

Each student is distilled here, then sampled from the same noise both ways:
- digits (ε, the SD1.5/Dreamshaper grid 999/749/499/249): the toy digits teacher with its recipe
  (tdm_core.toy.experiment, 500 iterations); Fréchet distance of 2000 samples to the teacher's 50-step samples
  (`*_fd_to_teacher50`, lower is closer; the teacher's own 4 steps for scale) and to the real digits (`*_fd`).
- sdxl (ε), flux, sd3 and sd35 (flow): the toy latent teachers of tdm_devkit/toy_latent_teacher.py (every
  element ±1, the prompt sets the share; the compact SDXL twin, the Flux twin, the SD3-medium and SD3.5-medium
  twins), distilled in-process through TDM Distill's own runtime with the quality check's settings (cfg 1, rank 16,
  batch 4, lr 5e-4; SDXL 160 iterations, the others 200); W1 distance of 128 samples' element values to the
  teacher's 50-step samples per prompt (`teacher_reference`, 2M; `floor`: two 50-step draws).
The `flux` preset samples its students with the flow DPM-Solver++(2M) because of these figures (tdm_core.presets),
and SD3/SD3.5 students keep their release's 2M: bench/pace.py (500 iterations, seeds 0/1/2; it prints both) finds
2M 1–22 % closer than their own DDIM step under every recipe but the SD3 family's last-step ones: there DDIM is 1–5 %
closer without the moving average (SD3 4.57 against 4.82, SD3.5 5.03 against 5.10), within the seeds' spread, and
the two draw with it (3.24 against 3.21, 3.37 against 3.38). (Against the reference before, 50 DDIM steps whose
SD3-family grid stopped at t = 67, 2M was 1.1–1.3 % closer on these toys.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LATENT_ITERATIONS = {"sdxl": 160, "flux": 200, "sd3": 200, "sd35": 200}
LATENT_SAMPLES = 128
# TDM Distill's inputs for a toy latent teacher: the quality check's (tests/test_sdxl_flux_quality.py) settings, but
# the LoRA's shape left to the recipe (-1), as a user's job leaves it (SDXL and Flux: rank 16, alpha = rank, the
# quality check's; SD3 and SD3.5: rank 32, alpha 64)
LATENT_SETTINGS = dict(steps=4, grid="auto", lora_rank=-1, lora_alpha=-1.0, learning_rate=5e-4, cfg=1.0, batch_size=4,
                       save_every=0, keep_last=1, preview_every=0, gradient_checkpointing=False, dtype="auto",
                       offload="none", unconditional_prompt="")


def _student_denoiser(trainer, grid, sigmas, cond, adapter):
    import torch

    from tdm_core.distill import losses

    def denoise(x, sigma_batch):
        # the grid timestep whose σ this is (σ = 0, the end, is never evaluated)
        t = min(zip(sigmas, grid, strict=False), key=lambda pair: abs(pair[0] - float(sigma_batch[0])))[1]
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        a, s = trainer._coef(tt)
        prediction = trainer.backend.forward(x, tt, cond, adapter)
        return losses.x0_and_eps(prediction, x, a, s, trainer.backend.parametrisation)[0]
    return denoise


def _sample(trainer, adapter, grid, solver, cond, noise, space):
    """`grid`'s integer timesteps through `solver` (tdm_core.solvers), ending at σ = 0: with the DDIM step this is
    exactly the trainer's own rollout. The student is its saved LoRA's weights (its moving average when the run keeps
    one, as TDMTrainer.sample does)."""
    import torch

    sigmas = [float(trainer.sigmas[t]) for t in grid] + [0.0]
    with trainer.averaged_student(adapter):
        return solver(_student_denoiser(trainer, grid, sigmas, cond, adapter), noise, torch.tensor(sigmas),
                      space=space, disable=True)


def digits(seed: int) -> dict:
    import torch

    from tdm_core import solvers
    from tdm_core.toy.evaluate import ToyEvaluator
    from tdm_core.toy.experiment import run_toy_distillation
    from tdm_core.toy.metrics import frechet_distance

    result = run_toy_distillation(iterations=500, eval_every=0, log=lambda message: None, seed=seed)
    trainer = result.trainer
    evaluator = ToyEvaluator(trainer.backend.teacher)
    teacher_50 = result.samples["teacher_50"].float().clamp(-1, 1)
    out = {"teacher_4_fd_to_teacher50": frechet_distance(result.samples["teacher_4"].float().clamp(-1, 1),
                                                         teacher_50)}
    for name in ("ddim", "dpmpp_2m"):
        parts = []
        with torch.no_grad():
            for i in range(0, len(evaluator.prompts), 1000):
                cond = trainer.backend.encode(evaluator.prompts[i:i + 1000])
                parts.append(_sample(trainer, "student", list(trainer.grid), solvers.get_solver(name), cond,
                                     evaluator.noise[i:i + 1000].float(), "vp"))
        samples = torch.cat(parts)
        out[f"{name}_fd_to_teacher50"] = frechet_distance(samples.clamp(-1, 1), teacher_50)
        out[f"{name}_fd"] = evaluator.score(samples)["fd"]
    return {k: round(v, 4) for k, v in out.items()}


def latent_session(family: str, iterations: int, seed: int, overrides: dict | None = None):
    """(an untrained job session, the toy module) for a toy latent teacher, built through TDM Distill's own runtime
    (nodes.distill_jobs.build_runtime) with LATENT_SETTINGS; `overrides` replace fields of the job's DistillConfig,
    but lora_rank / lora_alpha go to the node's inputs of those names (the adapters are made with the runtime; alpha
    None is the node's 0, alpha = rank), so a rank set alone keeps the recipe's alpha / rank."""
    import torch

    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.model_management

    from tdm_core.distill import DistillConfig
    from tdm_devkit import toy_latent_teacher as toy

    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    config = toy.TeacherConfig.for_family(family)
    model = toy.teacher_model(family, toy.teacher_file(config, log=lambda message: print(message, file=sys.stderr)))
    overrides = dict(overrides or {})
    shape = {key: overrides.pop(key) for key in ("lora_rank", "lora_alpha") if key in overrides}
    if "lora_alpha" in shape:
        shape["lora_alpha"] = float(shape["lora_alpha"] or 0.0)
    settings = dict(LATENT_SETTINGS, iterations=iterations, seed=seed, width=config.image_size,
                    height=config.image_size, **shape)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        runtime, _, _ = distill_jobs.build_runtime(model, toy.tiny_clip(family), settings, list(toy.PROMPTS))
    if overrides:
        runtime.config = DistillConfig.from_dict({**runtime.config.to_dict(), **overrides})
    with torch.inference_mode(False), torch.enable_grad():
        return runtime.build(None), toy


# What the latent toys' students are scored against, "teacher-50": the teacher's 50 steps of DPM-Solver++(2M) on an
# evenly spread grid (trainer.sample_grid). Its element values' std is within 0.3 % of the teacher's own ODE
# integrated over 250–500 steps (SD3 toy 0.906 against 0.903); 50 DDIM (Euler) steps are 3.5 % too narrow on the SD3
# toys, 2 % on Flux's and 1 % too wide on SDXL's, which a student that matches its teacher would be scored for
REFERENCE_STEPS = 50
REFERENCE_SOLVER = "dpmpp_2m"
REFERENCE_NOISE_SEED, FLOOR_NOISE_SEED = 11, 12  # the reference set's noise, and the floor's (a second draw)


def teacher_reference(trainer, prompt: str, floor: bool = False):
    """LATENT_SAMPLES teacher-50 samples of `prompt`; `floor`: the floor's independent draw."""
    return latent_draw(trainer, prompt, "teacher", trainer.sample_grid(REFERENCE_STEPS), REFERENCE_SOLVER,
                       FLOOR_NOISE_SEED if floor else REFERENCE_NOISE_SEED)


def latent_draw(trainer, prompt: str, adapter: str, grid: list[int], solver: str, noise_seed: int):
    """LATENT_SAMPLES samples of `prompt` from `adapter` on `grid` with `solver`, from fixed noise."""
    import torch

    from tdm_core import solvers

    space = "flow" if trainer.backend.parametrisation == "flow" else "vp"
    noise = torch.randn((LATENT_SAMPLES, *trainer.backend.latent_shape),
                        generator=torch.Generator().manual_seed(noise_seed))
    cond = trainer.backend.encode([prompt] * LATENT_SAMPLES)
    with torch.no_grad():
        return _sample(trainer, adapter, grid, solvers.get_solver(solver), cond, noise, space)


def latent(family: str, seed: int) -> dict:
    import torch

    session, toy = latent_session(family, LATENT_ITERATIONS[family], seed)
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(LATENT_ITERATIONS[family]):
            session.step()
    trainer = session.trainer
    grid = list(trainer.grid)
    out = {}
    for prompt in toy.PROMPTS:
        reference = teacher_reference(trainer, prompt)
        row = {"floor": toy.value_distance(teacher_reference(trainer, prompt, floor=True), reference)}
        for who in ("teacher", "student"):
            for solver in ("ddim", "dpmpp_2m"):
                row[f"{who}_4_{solver}"] = toy.value_distance(latent_draw(trainer, prompt, who, grid, solver, 7),
                                                              reference)
        out[prompt] = {k: round(v, 4) for k, v in row.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--families", default="digits,sdxl,flux,sd3,sd35")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    line = {"bench": "student_solver"}
    for family in args.families.split(","):
        for seed in range(args.seeds):
            line[f"{family}_seed{seed}"] = digits(seed) if family == "digits" else latent(family, seed)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
