"""How close a toy latent student's adapter can get to its teacher's 50 steps when taught the answer directly; prints
ONE JSON line.

    .venv/bin/python bench/latent_regression.py [--targets sd3,sd35,flux,sdxl] [--iterations 500] [--seeds 0]
                                                [--pairs 256] [--threads 1]

Why. bench/pace.py's latent toys measure how far TDM brings a 4-step student towards its teacher's 50 steps. This
script asks what the same adapter could reach if the answer were known: the student's LoRA, built by the same TDM
Distill runtime with the same settings (student_solver.latent_session: the family's recipe at lr 5e-4, batch 4, its
optimiser, rate and gradient clip), is trained by plain regression: from fixed noise (--pairs per prompt, seed 1000 +
the prompt's index) to the teacher's own 50-step DDIM sample of that noise, the student's 4 DDIM steps on its
training grid backpropagated end to end, MSE on x̂0, one optimiser step per batch of `batch_size` random pairs. A
student that gets there fast shows the adapter can hold the teacher's 50-step map, so what TDM leaves on the table
is its training signal, not the LoRA's capacity. It is a probe of the adapter, not a training mode the project ships
(it needs the teacher's 50-step samples; TDM is data-free).

Scored exactly as bench/pace.py scores the latent toys: the student sampled with its family's solver on its grid
(128 samples per prompt, noise seed 7), the W1 distance of its element values to teacher-50
(student_solver.teacher_reference, noise seed 11), summed over the prompts, over the floor (a second draw, seed 12).
The regression targets come from the same sampler (50 steps of DPM-Solver++(2M)).

Figures per target <t>: <t>_teacher4_to_floor (the untrained student: the teacher on the student's grid and solver),
<t>_ratio_to_floor_at {iterations: ratio} at 100/250/500/1000 (those ≤ --iterations) and at the end, mean over the
seeds; <t>_ratio_to_floor (the end), <t>_seconds (training wall time per seed). Measured (seed 0, 500 iterations, each
family's recipe as `auto` picks it): at 100 / 250 / 500 iterations SD3 1.20 / 2.24 / 1.02, SD3.5 2.06 / 3.25 / 1.10,
Flux 1.34 / 1.74 / 1.60, SDXL 1.97 / 1.85 / 1.70, where TDM reaches 4.82, 5.10, 8.20 and 1.26 at 500 (bench/pace.py,
seeds 0/1/2).
Time on 2 CPU cores (--threads 1): the four targets at 500 iterations, one seed, in about four minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHECKPOINTS = (100, 250, 500, 1000)
TARGETS = ("sdxl", "flux", "sd3", "sd35")


def regress(family: str, iterations: int, seed: int, pairs: int, log=lambda message: None) -> dict:
    return regressed_student(family, iterations, seed, pairs, log)[0]


def regressed_student(family: str, iterations: int, seed: int, pairs: int, log=lambda message: None):
    """(regress's figures, the job session whose student was regressed, the toy module): bench/fake_fit.py goes on
    with the session's trainer."""
    import torch
    from pace import _latent_distance, _latent_samples
    from student_solver import REFERENCE_SOLVER, REFERENCE_STEPS, _sample, latent_session, teacher_reference

    from tdm_core import presets, solvers
    from tdm_core.distill import losses

    session, toy = latent_session(family, iterations, seed)
    trainer = session.trainer
    trainer.student_ema = None  # the probe scores the regressed weights themselves (no TDM update feeds an average)
    grid, fine = list(trainer.grid), list(trainer.sample_grid(REFERENCE_STEPS))
    space = "flow" if trainer.backend.parametrisation == "flow" else "vp"
    solver = presets.student_solver(trainer.config.sampler_preset, trainer.backend.parametrisation)
    noise, targets, prompts = [], [], []
    for index, prompt in enumerate(toy.PROMPTS):
        draw = torch.randn((pairs, *trainer.backend.latent_shape), generator=torch.Generator().manual_seed(1000 + index))
        with torch.no_grad():
            targets.append(_sample(trainer, "teacher", fine, solvers.get_solver(REFERENCE_SOLVER),
                                   trainer.backend.encode([prompt] * pairs), draw, space))
        noise.append(draw)
        prompts += [prompt] * pairs
    noise, targets = torch.cat(noise), torch.cat(targets)
    # bench/pace.py's scoring of the latent toys, with its noise seeds
    reference = {p: teacher_reference(trainer, p) for p in toy.PROMPTS}
    floor = _latent_distance(toy, reference, {p: teacher_reference(trainer, p, floor=True) for p in toy.PROMPTS})

    def ratio() -> float:
        return _latent_distance(toy, reference, _latent_samples(trainer, toy.PROMPTS, "student", grid, solver, 7)) / floor

    out = {"teacher4_to_floor": ratio(), "at": {}}
    optimiser, generator = trainer.opt_gen, torch.Generator().manual_seed(seed)
    params = [p for group in optimiser.param_groups for p in group["params"]]
    seconds = 0.0
    with torch.inference_mode(False), torch.enable_grad():
        for iteration in range(1, iterations + 1):
            start = time.perf_counter()
            rows = torch.randint(len(noise), (trainer.config.batch_size,), generator=generator)
            x, cond = noise[rows], trainer.backend.encode([prompts[i] for i in rows.tolist()])
            for k, t in enumerate(grid):
                tt = torch.full((x.shape[0],), t, dtype=torch.long)
                x0, eps = losses.x0_and_eps(trainer.backend.forward(x, tt, cond, "student"), x, *trainer._coef(tt),
                                            trainer.backend.parametrisation)
                if k + 1 < len(grid):
                    x = losses.ddim_renoise(x0, eps, *trainer._coef(torch.full_like(tt, grid[k + 1])))
            loss = torch.nn.functional.mse_loss(x0.float(), targets[rows].float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if trainer.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, trainer.config.grad_clip)
            optimiser.step()
            seconds += time.perf_counter() - start
            if iteration in CHECKPOINTS:
                out["at"][iteration] = ratio()
                log(f"{family} seed {seed} iteration {iteration}: ratio to floor {out['at'][iteration]:.3f}")
    out["end"], out["seconds"] = ratio(), seconds
    return out, session, toy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sd3,sd35,flux,sdxl")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--pairs", type=int, default=256, help="noise → teacher-50 pairs per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets) or args.iterations < 0 or args.pairs < 1:
        print(f"error: --targets from {TARGETS}, --iterations ≥ 0, --pairs ≥ 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    seeds = [int(s) for s in args.seeds.split(",")]
    line = {"bench": "latent_regression", "iterations": args.iterations, "seeds": seeds, "pairs": args.pairs}
    for target in targets:
        runs = [regress(target, args.iterations, seed, args.pairs, log=lambda m: print(m, file=sys.stderr))
                for seed in seeds]
        line[f"{target}_teacher4_to_floor"] = round(runs[0]["teacher4_to_floor"], 3)
        line[f"{target}_ratio_to_floor_at"] = {str(i): round(sum(r["at"][i] for r in runs) / len(runs), 3)
                                               for i in sorted(runs[0]["at"])}
        line[f"{target}_ratio_to_floor"] = round(sum(r["end"] for r in runs) / len(runs), 3)
        line[f"{target}_seconds"] = round(sum(r["seconds"] for r in runs) / len(runs), 1)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
