"""Where a 4-step TDM student's samples between modes come from, and how far ANY training of its last step could bring
them down in the updates the pace goal allows; prints ONE JSON line.

    .venv/bin/python bench/pace_anatomy.py [--targets mix2d_features,mix16d_features] [--iterations 500]
                                           [--updates 125,250,500] [--seed 0] [--threads 1]

Why. bench/pace.py's goal asks a 4-step student for a between-mode share within 2× of the 50-step teacher's. This
script splits that share by step, on the mixture targets whose teacher is the EXACT ε ("mix2d", "mix16d" and their
"_features" variants, see bench/pace.py), so every "teacher" figure below is exact, not a trained approximation.

Figures per target <t> (the student: bench/pace.py's toy recipe, --iterations, --seed; samples from pace's fixed
noise, shares as pace's `between_share`: outside every mode's 99.9 % ball):
- <t>_between_teacher_by_steps: {K: share} of the exact ε's deterministic DDIM on the uniform K-step grid (999, …),
  K = 4 … 100; <t>_goal: 2 × the K = 50 share (pace's goal), <t>_goal_steps: the fewest of those K whose exact DDIM
  meets it. The goal asks the 4-step student to separate modes as well as that many exact steps do.
- <t>_between_student: the distilled student's own 4 steps.
- <t>_between_handoff: {t_k: share}: the student's first k steps, then the exact teacher's DDIM (stride 20) from the
  student's state at grid time t_k down to 0. If these are near teacher-50's share while the student's is not, the
  samples between modes are made by the student's LAST step alone (one network evaluation from x_{t_last}).
- <t>_last_step_ceiling: {lr: {updates: share}}: the student's adapter, fresh (at the teacher), trained for its last
  step only by plain regression on the exact answer: inputs x_{t_last} on the exact teacher's fine DDIM (stride 10)
  from fresh noise, target the exact teacher's DDIM (stride 20) from that state to 0, MSE on x̂0, AdamW with the
  recipe's betas, eps, weight decay and student gradient clip, the recipe's batch, at the recipe's student learning
  rate and at its fake-score rate. Scored on the x_{t_last} of the fixed noise. TDM trains the same adapter on a
  distribution-level signal and, with stages "one", spends a quarter of its updates on this step, so this is an
  indication of the best the adapter's capacity and step size allow, not a bound a distribution-matching loss must
  respect. <t>_last_step_target: the share of the regression targets themselves (on the fixed noise).
- <t>_seconds: wall time of the target.

Time on 2 CPU cores (--threads 1): about 1.5 minutes per target once the learned teachers are cached (bench/pace.py
trains and caches them on first use, about five minutes each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pace  # noqa: E402  (bench/pace.py: the targets, their references and the toy recipe)

TEACHER_STEPS = (4, 6, 8, 10, 15, 20, 30, 50, 100)
HANDOFF_STRIDE = 20  # the exact teacher's DDIM stride after a hand-off (50 steps over the full range)
PROBE_INPUT_STRIDE = 10  # the exact teacher's DDIM stride that makes the probe's inputs x_{t_last}
PROBE_SEED = 1000  # probe batch i draws its noise from seed PROBE_SEED + i
EXACT_TARGETS = ("mix2d", "mix16d")


def exact_states(spec, abar, noise, t_stop: int, stride: int):
    """The exact teacher's deterministic DDIM from `noise` (labelled 999) down to the STATE at t_stop (no x̂0 step)."""
    from tdm_core.toy import mixture as mx
    from tdm_core.toy.sampling import ddim_sample

    return ddim_sample(mx.exact_eps_fn(spec, abar), noise.double(), list(range(999, t_stop, -stride)), abar,
                       stop_at=t_stop).float()


def finish_exactly(spec, abar, x, t_from: int):
    """The exact teacher's DDIM (stride HANDOFF_STRIDE) from the state x at t_from to x̂0."""
    from tdm_core.toy import mixture as mx
    from tdm_core.toy.sampling import ddim_sample

    return ddim_sample(mx.exact_eps_fn(spec, abar), x.double(), list(range(t_from, -1, -HANDOFF_STRIDE)),
                       abar).float()


def last_step_probe(target: str, ref: dict, config, lr: float, updates: list[int], eval_states) -> dict[str, float]:
    """{updates: between share} of a fresh student adapter regressed on the exact answer of its last step."""
    import torch

    from tdm_core.distill import TDMTrainer, losses
    from tdm_core.toy import mixture as mx

    spec = ref["spec"]
    trainer = TDMTrainer(pace.mixture_backend(target, ref, config), config)  # adapters at the teacher, untrained
    backend, t_last, abar = trainer.backend, int(trainer.grid[-1]), trainer.backend.schedule.alphas.pow(2)
    params = trainer.student_params
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)

    def predict(x):
        tt = torch.full((x.shape[0],), t_last, dtype=torch.long)
        a, s = trainer._coef(tt)
        out = backend.forward(x, tt, backend.encode(["0"] * x.shape[0]), "student")
        return losses.x0_from_prediction(out, x, a, s, backend.parametrisation)

    shares = {}
    for i in range(1, max(updates) + 1):
        noise = torch.randn(config.batch_size, spec.dim, generator=torch.Generator().manual_seed(PROBE_SEED + i))
        x = exact_states(spec, abar, noise, t_last, PROBE_INPUT_STRIDE)
        target_x0 = finish_exactly(spec, abar, x, t_last)
        loss = (predict(x) - target_x0).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if i in updates:
            with torch.no_grad():
                shares[str(i)] = round(mx.between_share(spec, predict(eval_states)), 5)
    return shares


def anatomy(target: str, iterations: int, seed: int, updates: list[int]) -> dict:
    import torch

    from tdm_core.distill import TDMTrainer
    from tdm_core.toy import mixture as mx

    started = time.perf_counter()
    ref = pace.mixture_reference(pace.base_mixture(target))
    spec, noise = ref["spec"], ref["noise"]
    config = pace.build_configs([target], {}, iterations, seed)[target]
    out = {}
    by_steps = {str(k): round(mx.between_share(spec, mx.teacher_samples(spec, noise, k)), 5) for k in TEACHER_STEPS}
    goal = 2 * by_steps["50"]
    out[f"{target}_between_teacher_by_steps"] = by_steps
    out[f"{target}_goal"] = round(goal, 5)
    out[f"{target}_goal_steps"] = next((k for k in TEACHER_STEPS if by_steps[str(k)] <= goal), None)

    trainer = TDMTrainer(pace.mixture_backend(target, ref, config), config)
    trainer.train(iterations, None)
    abar = trainer.backend.schedule.alphas.pow(2)
    with torch.no_grad():
        states, x0s, _ = trainer.rollout(noise, trainer.backend.encode(["0"] * len(noise)))
    out[f"{target}_between_student"] = round(mx.between_share(spec, x0s[-1].float()), 5)
    out[f"{target}_between_handoff"] = {
        str(t): round(mx.between_share(spec, finish_exactly(spec, abar, states[k].float(), int(t))), 5)
        for k, t in enumerate(trainer.grid)}
    pace.log(f"{target}: student {out[f'{target}_between_student']}, hand-off {out[f'{target}_between_handoff']}")

    t_last = int(trainer.grid[-1])
    eval_states = exact_states(spec, abar, noise, t_last, PROBE_INPUT_STRIDE)
    out[f"{target}_last_step_target"] = round(mx.between_share(spec, finish_exactly(spec, abar, eval_states, t_last)),
                                              5)
    ceiling = {}
    for lr in (config.student_learning_rate(), config.lr):
        ceiling[f"{lr:g}"] = last_step_probe(target, ref, config, lr, updates, eval_states)
        pace.log(f"{target}: last-step regression at lr {lr:g}: {ceiling[f'{lr:g}']}")
    out[f"{target}_last_step_ceiling"] = ceiling
    out[f"{target}_seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="mix2d_features,mix16d_features")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--updates", default="125,250,500", help="probe checkpoints (regression updates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    known = [*EXACT_TARGETS, *(m + pace.FEATURES for m in EXACT_TARGETS)]
    bad = [t for t in targets if t not in known]
    try:
        updates = sorted({int(u) for u in args.updates.split(",") if u.strip()})
    except ValueError:
        updates = []
    if bad or not targets or not updates or updates[0] < 1 or args.iterations < 1:
        print(f"error: targets must be among {known} (got {bad or targets}), --updates positive integers, "
              "--iterations ≥ 1", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    line = {"bench": "pace_anatomy", "iterations": args.iterations, "seed": args.seed}
    for target in targets:
        line.update(anatomy(target, args.iterations, args.seed, updates))
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
