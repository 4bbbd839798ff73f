"""Does the fake score describe what the student samples? Prints ONE JSON line.

    .venv/bin/python bench/fake_fit.py [--targets flux,sdxl,sd3] [--fake-updates 200] [--seed 0] [--threads 1]

Why. TDM moves the student along (teacher − fake score): the student stops where the fake score, fitted to the
student, describes the teacher's distribution. If a fake score fitted to a student that already samples the teacher's
distribution describes something else, TDM pushes that student away from the teacher, and the better the fake score
is fitted the farther. This measures that bias directly, on the toy latent teachers of bench/pace.py.

How. For each target the student's LoRA is first regressed onto teacher-50 (bench/latent_regression.py: 500
iterations, its settings), so it samples the teacher's 50-step distribution, and then frozen. A fresh fake score is
fitted to it by TDM's updates with the family's recipe (`auto`) for --fake-updates updates (each update's student
change is undone: the student stays the regressed one), once with `fake_samples` "step" (the official draw: the
x̂0 of the step each update draws, at τ in that step's interval) and once with "output" (each sample's last x̂0,
its output, at τ anywhere up to full noise). The fake score is then sampled as a diffusion model: 50 steps of
DPM-Solver++(2M) on the evenly spread grid from teacher-50's noise (student_solver.teacher_reference's sampler).

Figures per target <t>, each per prompt: <t>_student_spread, the element std of the frozen student's own 4-step DDIM
samples (the rollout the fake score learns from) over teacher-50's; <t>_fake_spread_step / _output, the fake
score's 50-step samples' std over the student's; <t>_fake_mean_shift_step / _output, their mean minus the student's;
<t>_regressed_ratio_to_floor, the regressed student's distance to teacher-50 over the floor (bench/pace.py's
score). 1.0 in _fake_spread_ is a fake score that describes the student's spread. Measured (seed 0, 200 updates;
fake spread step / output): Flux 1.07 / 1.00 (its students under the official draw end 5–8 % too narrow), SDXL
0.95 / 0.99 (theirs 6 % too wide), SD3 under its recipe 1.01 / 1.01 (its last-step updates already fit the output);
see the README's pace section. Time on 2 CPU cores (--threads 1): Flux about 30 s (one regression serves both
fits), SDXL's UNet a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ("flux", "sdxl", "sd3", "sd35")
REGRESSION_ITERATIONS, REGRESSION_PAIRS = 500, 256


def _fake_fits(family: str, updates: int, seed: int) -> dict:
    """The regressed student's figures, then for each `fake_samples` the fake score fitted from the same start."""
    import copy

    import torch
    from latent_regression import regressed_student
    from student_solver import REFERENCE_NOISE_SEED, REFERENCE_SOLVER, REFERENCE_STEPS, latent_draw, teacher_reference

    from tdm_core.distill.config import FAKE_SAMPLES

    figures, session, toy = regressed_student(family, REGRESSION_ITERATIONS, seed, REGRESSION_PAIRS)
    trainer = session.trainer
    grid, fine = list(trainer.grid), list(trainer.sample_grid(REFERENCE_STEPS))
    students = {p: latent_draw(trainer, p, "student", grid, "ddim", 7) for p in toy.PROMPTS}
    out = {"regressed_ratio_to_floor": figures["end"],
           "student_spread": {p: round(float(students[p].std() / teacher_reference(trainer, p).std()), 4)
                              for p in toy.PROMPTS}}
    regressed = copy.deepcopy(trainer.state_dict())  # each way of fitting starts from this fresh fake score
    for fake_samples in FAKE_SAMPLES:
        trainer.load_state_dict(regressed)
        trainer.config.fake_samples = fake_samples
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(updates):
                student = [p.detach().clone() for p in trainer.student_params]
                trainer.step()
                with torch.no_grad():  # the student stays the regressed one: only the fake score learns
                    for param, kept in zip(trainer.student_params, student, strict=True):
                        param.copy_(kept)
        fakes = {p: latent_draw(trainer, p, "fake", fine, REFERENCE_SOLVER, REFERENCE_NOISE_SEED) for p in toy.PROMPTS}
        out[f"fake_spread_{fake_samples}"] = {p: round(float(fakes[p].std() / students[p].std()), 4)
                                              for p in toy.PROMPTS}
        out[f"fake_mean_shift_{fake_samples}"] = {p: round(float(fakes[p].mean() - students[p].mean()), 4)
                                                  for p in toy.PROMPTS}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="flux")
    parser.add_argument("--fake-updates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets) or args.fake_updates < 1:
        print(f"error: --targets from {TARGETS}, --fake-updates ≥ 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    line = {"bench": "fake_fit", "seed": args.seed, "fake_updates": args.fake_updates}
    for target in targets:
        fits = _fake_fits(target, args.fake_updates, args.seed)
        line[f"{target}_regressed_ratio_to_floor"] = round(fits.pop("regressed_ratio_to_floor"), 3)
        line.update({f"{target}_{key}": value for key, value in fits.items()})
        print(f"{target}: {fits}", file=sys.stderr)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
