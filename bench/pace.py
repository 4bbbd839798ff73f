"""How fast and how close a TDM student gets to its teacher on multi-modal toy targets; prints ONE JSON line.

    .venv/bin/python bench/pace.py [--iterations 500] [--targets mix2d,mix16d,digits,sdxl,flux,sd3,sd35]
                                   [--set key=json ...] [--seeds 0] [--threads 1] [--trace-every N]

Targets. "mix2d_learned" / "mix16d_learned": the same mixtures and data, with a teacher that learned them from
samples (tdm_core.toy.teacher.LEARNED_MIXTURE_TEACHERS: a 3-block MLP, 6000 steps, trained once and cached, about
five minutes each on 2 CPU cores), the LoRAs on its own linears as on a real checkpoint's.
"mix2d_features" / "mix16d_features": the EXACT-ε teacher of "mix2d" / "mix16d" below, with the LoRAs on the learned
teacher's network minus its frozen copy (MixtureEpsNet's `features`): the teacher and its 50/4-step figures are the
exact ones, the adapters act on learned, non-zero weights. Measured (`--targets mix2d_features,mix16d_features,mix2d,
mix16d --seeds 0,1,2`, 500 iterations, the toy recipe): ratio 1.05 (2-D; seeds 1.20 / 0.95 / 1.00) and 1.06 (16-D;
1.01 / 1.20 / 0.98), between modes 14 % / 4.7 % (teacher-50: 0.5 % / 0 %), against 2.10 / 2.65 and 31 % / 5.9 % on
the random zero-output residual in the same run: the exact targets' stall is the adapters' features, not the recipe.
"mix2d" / "mix16d": the analytic Gaussian mixtures of tdm_core/toy/mixture.py (2-D: 5 modes on the unit
circle, weights 0.5/0.25/0.15/0.07/0.03, std 0.1; 16-D: 8 mutually orthogonal centres of norm 2, weights ∝ 0.6^i
(0.41 … 0.011), std 0.2), whose teacher is the EXACT ε of the mixture (a frozen zero-output residual MLP carries
the LoRA adapters). "digits": the trained 8x8-digits teacher of bench/distill.py, run through
tdm_core.toy.experiment.run_toy_distillation.

Samples, all from fixed noise (mixtures: 4096 × dim N(0, I) draws, torch.Generator seed 0; digits: ToyEvaluator's
2000 = 200 per class, seed 0), identical for every model: teacher-50 / teacher-4 = deterministic DDIM (η = 0) with
the teacher's ε on the uniform grid 999, 979, …, 19 / 999, 749, 499, 249, ending at x̂0; student = the TDM
student's own 4 steps (`TDMTrainer.sample`, the training rollout) on 999, 749, 499, 249. Even with the exact ε,
teacher-50 is not the data: its last step returns the posterior mean x̂0 at t = 19 (σ = 0.13), which shrinks each
mix2d mode's spread to ~0.6 × std, and it starts from N(0, I) rather than the true t = 999 marginal; hence
d_teacher50 ≈ 3 × floor on mix2d, 2.5 × on mix16d.

Figures, per target <t> (prefix "mix2d_", "mix16d_", "digits_"):
- <t>_d_teacher50, <t>_d_teacher4, <t>_d_student: distance to the DATA. Mixtures: sliced 2-Wasserstein distance
  (tdm_core.toy.mixture.sliced_wasserstein: 256 fixed random unit directions, seed 0, sorted-quantile matching) of
  the 4096 generated samples to a 20000-sample exact reference (torch.Generator seed 1234). Digits: the pixel FD of
  bench/distill.py against all 1797 digits (its fd_teacher_50 / fd_teacher_4 / fd_tdm_4).
- <t>_ratio = d_student / d_teacher50 (goal ≤ 1.10); <t>_ratio_at = {"100": r, "250": r, "500": r}: the same ratio
  of the student after that many iterations (those ≤ --iterations), i.e. the pace.
- <t>_floor (mixtures): the distance of a fresh 4096-sample exact draw (seed 4321) to the reference: what a perfect
  sampler would score, the noise floor of d_*.
- <t>_between_student / _teacher50 / _teacher4 / _data (mixtures): the share of samples outside every mode's
  99.9 % ball (squared distance to every centre > std² · chi-square(dim) 0.999 quantile), "_data" over the 20000
  reference samples (≈ 0.001 by construction). bench/pace_anatomy.py splits the student's share by step.
- <t>_tv_student / _teacher50 / _teacher4 (mixtures): total variation ½ Σ_i |share_i − w_i| between the shares of
  samples whose nearest centre is mode i and the true weights w_i (lost small modes show up here).
- <t>_seconds: the student's training time (sum of TDMTrainer.step times; evaluations excluded).
- <t>_ratio_by_seed: {seed: ratio}; with several --seeds every student figure (d_student, ratio, ratio_at,
  between_student, tv_student, seconds) is the mean over the seeds.
Top level: "bench": "pace", "iterations", "seeds", "recipe" (the DistillConfig fields of the run that differ from
DistillConfig()'s defaults, the per-target "prompts" (mixtures ["0"], digits "0".."9"), "family" and "seed" left
out), "worst_ratio" (max of <t>_ratio over the targets), "goal_met" (worst_ratio ≤ 1.10 and every mixture's
between_student ≤ 2 × between_teacher50).

Recipe: the toy one, tdm_core.toy.experiment.digits_distill_config (lr 1e-3, batch 256, LoRA rank 64, N = 1000,
K = 4, cfg 1.0, AdamW betas (0, 0.95), seed 0), with prompts ["0"] and family toy_<name> for the mixtures.
`--set key=json` (repeatable) overrides any DistillConfig field for every target (a value that is not JSON is
taken as a string); an unknown key or an invalid value exits with status 2 and the DistillConfig error before any
training. `--set seed=…` is the seed when --seeds is not given; `--set iterations=…` replaces --iterations. The
digits target builds its backend inside run_toy_distillation (rank and seed from the config; lora_alpha,
lora_target_modules and mode keep ToyBackend's defaults there), the mixtures through tdm_core.toy.mixture's
make_backend (every LoRA field of the config).

Latent targets. "sdxl" / "flux" / "sd3" / "sd35": the toy latent teachers of tdm_devkit/toy_latent_teacher.py (tiny
twins of the family in ComfyUI's layout, trained on latents whose every element is ±1 plus a little noise, the prompt
setting the share), distilled through TDM Distill's own runtime (nodes.distill_jobs.build_runtime) with the quality
check's settings (student_solver.LATENT_SETTINGS; "latent_recipe": learning_rate 5e-4, batch 4, cfg 1, the LoRA shape
of the family's recipe, then every --set field but the adapters' target modules and mode; a --set lora_rank alone
keeps the recipe's alpha / rank). Their 50-step samples are themselves far from the task's data (Flux: W1 0.74 against
a floor of 0.016), so a distance to the data would measure the teacher: they are scored by the W1 distance of 128
samples' element values per prompt to teacher-50, the teacher's own 50-step samples (summed over the two prompts;
`floor`: a second 50-step draw). Teacher-50 is student_solver.teacher_reference: DPM-Solver++(2M) on an evenly spread
grid, within 0.3 % of the teacher's ODE integrated over 250–500 steps (the teacher's 50 DDIM steps, the reference until
December 2026, are 1–3.5 % off: <t>_teacher50_ddim_to_floor scores them like a student). What those distances are made
of: the trained teachers' element values are close to Gaussian per prompt, not the ±1 modes of their training data
(measured on teacher-50, SD3 / SD3.5 / Flux toys: mean ±0.50, std 0.91, skewness within ±0.04; SDXL's mean ±0.26, std
1.74, also one bump), so the figures are <t>_mean_teacher50 / <t>_std_teacher50 / <t>_mean_student ({prompt: value}, the
students' averaged over the seeds); <t>_spread_teacher4 / <t>_spread_student (each prompt's std over teacher-50's; the
students' averaged over the seeds) and <t>_mean_gap (the students' mean |mean − teacher-50's| over prompts and seeds);
<t>_moments_matched_to_floor: the students' distance once each prompt's values are shifted and scaled to teacher-50's
mean and std, over the floor (what the student gets wrong beyond those two numbers; 1 = nothing); <t>_share_teacher50
/ _teacher4 / _student (each prompt's share of positive elements, which for near-Gaussian values is Φ(mean / std)) and
<t>_share_gap (the students' mean |share − teacher-50's|); with `--trace-every N`, <t>_share_trace and
<t>_spread_trace = {seed: {iteration: [value per prompt]}} every N iterations; <t>_removed = 1 − d_student /
d_teacher4, the share of the teacher's 4-step distance the student removes (<t>_removed_at at 100/250/500 iterations,
<t>_removed_by_seed), and <t>_ratio_to_floor = d_student / floor: the mixtures' ratio read the same way (the distance
to the 50-step teacher's samples over a second 50-step draw's, so 1 is a student indistinguishable from teacher-50 at
this sample size; teacher-4's is <t>_teacher4_to_floor); <t>_ratio_to_floor_ddim and <t>_spread_student_ddim: the
same students sampled with the DDIM step they were trained with (their family's solver may differ: 2M for the flow
families).
They are not part of worst_ratio / goal_met.

Time on 2 CPU cores (--threads 1; measured): 500 iterations train in ~14 s per mixture target (~25 s wall each
with sampling and evaluation), ~35 s for digits (~45 s wall once its teacher is cached; the first use trains and
caches it, about a minute more); the default three-target run takes about 1.5 minutes. --iterations 20 --targets
mix2d: ~10 s. The three latent targets at 500 iterations: a few minutes (each teacher is trained once and cached).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHECKPOINTS = (100, 250, 500)
GOAL_RATIO = 1.10
MIXTURE_SAMPLES = 4096
REFERENCE_SAMPLES = 20000
REFERENCE_SEED = 1234
FLOOR_SEED = 4321
NOISE_SEED = 0
PER_TARGET_FIELDS = ("prompts", "family", "seed")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_sets(items: list[str]) -> dict:
    """`key=json` pairs; a value that is not JSON is kept as the string itself (tau_mode=shared)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def build_configs(targets: list[str], overrides: dict, iterations: int, seed: int) -> dict:
    """{target: DistillConfig}, every one validated against the 1000-step toy schedule; raises ConfigError (unknown
    key, bad value) before anything is trained."""
    from tdm_core.distill import DistillConfig
    from tdm_core.toy.experiment import digits_distill_config
    from tdm_core.toy.mixture import mixture_distill_config

    configs = {}
    for target in targets:
        base = digits_distill_config() if target == "digits" else mixture_distill_config(base_mixture(target))
        data = {**base.to_dict(), **overrides, "iterations": iterations, "seed": seed}
        configs[target] = DistillConfig.from_dict(data).validate(num_timesteps=1000)
    return configs


def recipe(config) -> dict:
    from tdm_core.distill import DistillConfig

    used, default = config.to_dict(), DistillConfig().to_dict()
    return {k: v for k, v in used.items() if k not in PER_TARGET_FIELDS and v != default[k]}


def _ratio_at(values: dict[int, float], d_teacher50: float) -> dict[str, float]:
    return {str(i): round(v / d_teacher50, 4) for i, v in sorted(values.items())}


def mixture_reference(target: str) -> dict:
    """The seed-independent half of a mixture target: reference, floor, fixed noise, teacher-50 / teacher-4."""
    import torch

    from tdm_core.toy import mixture as mx
    from tdm_core.toy import mixture_spec as ms

    spec = ms.get_mixture(target)
    reference = spec.sample(REFERENCE_SAMPLES, torch.Generator().manual_seed(REFERENCE_SEED))
    fresh = spec.sample(MIXTURE_SAMPLES, torch.Generator().manual_seed(FLOOR_SEED))
    noise = torch.randn(MIXTURE_SAMPLES, spec.dim, generator=torch.Generator().manual_seed(NOISE_SEED))
    t50, t4 = mx.teacher_samples(spec, noise, 50), mx.teacher_samples(spec, noise, 4)
    return {"spec": spec, "reference": reference, "noise": noise, "t50": t50, "figures": {
        "d_teacher50": mx.sliced_wasserstein(t50, reference),
        "d_teacher4": mx.sliced_wasserstein(t4, reference),
        "floor": mx.sliced_wasserstein(fresh, reference),
        "between_teacher50": mx.between_share(spec, t50),
        "between_teacher4": mx.between_share(spec, t4),
        "between_data": mx.between_share(spec, reference),
        "tv_teacher50": mx.mode_weight_tv(spec, t50),
        "tv_teacher4": mx.mode_weight_tv(spec, t4),
    }}


LEARNED = "_learned"  # suffix of a mixture target whose teacher is a network that learned the mixture
# suffix of a mixture target whose teacher is the EXACT ε but whose adapters sit on the learned network's features
FEATURES = "_features"


def base_mixture(target: str) -> str:
    return target.removesuffix(LEARNED).removesuffix(FEATURES)


def learned_reference(target: str) -> dict:
    """mixture_reference for a "<mixture>_learned" target: the same data, reference and noise; the teacher is the
    toy MLP trained on the mixture's samples (tdm_core.toy.teacher.LEARNED_MIXTURE_TEACHERS, cached), sampled by
    DDIM with its own ε."""
    import torch

    from tdm_core.toy import mixture as mx
    from tdm_core.toy.sampling import ddim_sample, uniform_grid
    from tdm_core.toy.teacher import LEARNED_MIXTURE_TEACHERS, load_or_train_teacher

    name = base_mixture(target)
    ref = mixture_reference(name)
    teacher = load_or_train_teacher(LEARNED_MIXTURE_TEACHERS[name], log=log)
    labels = torch.zeros(len(ref["noise"]), dtype=torch.long)

    def samples(steps: int) -> torch.Tensor:
        with torch.no_grad():
            return ddim_sample(lambda x, t: teacher.net(x, t, labels[:len(x)]), ref["noise"], uniform_grid(steps),
                               teacher.alphas_cumprod).float()

    t50, t4 = samples(50), samples(4)
    spec, reference = ref["spec"], ref["reference"]
    ref["figures"].update(d_teacher50=mx.sliced_wasserstein(t50, reference),
                          d_teacher4=mx.sliced_wasserstein(t4, reference),
                          between_teacher50=mx.between_share(spec, t50), between_teacher4=mx.between_share(spec, t4),
                          tv_teacher50=mx.mode_weight_tv(spec, t50), tv_teacher4=mx.mode_weight_tv(spec, t4))
    ref["teacher"] = teacher
    return ref


def mixture_backend(target: str, ref: dict, config):
    """The distillation backend of a mixture target: the LoRAs on the learned teacher's own linears ("_learned"), on
    the learned network's features over the exact teacher ("_features"), or on the exact teacher's zero residual."""
    from tdm_core.toy import mixture as mx
    from tdm_core.toy.backend import ToyBackend, adapter_settings

    if "teacher" in ref:  # a learned target: the LoRAs on the trained teacher's own linears
        return ToyBackend(ref["teacher"], mode=config.mode, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                          target_modules=config.lora_target_modules, adapter_seed=config.seed)
    if target.endswith(FEATURES):  # the exact teacher, the LoRAs on the learned teacher's linears
        from tdm_core.toy.teacher import LEARNED_MIXTURE_TEACHERS, load_or_train_teacher

        learned = load_or_train_teacher(LEARNED_MIXTURE_TEACHERS[base_mixture(target)], log=log)
        return mx.MixtureBackend(ref["spec"], features=learned.net, **adapter_settings(config, None, None))
    return mx.make_backend(config, target=target)


def mixture_student(target: str, ref: dict, config) -> dict:
    """Distils a student with `config` and scores it at the checkpoints and at the end."""
    import torch

    from tdm_core.distill import TDMTrainer
    from tdm_core.toy import mixture as mx

    spec, reference, noise = ref["spec"], ref["reference"], ref["noise"]
    trainer = TDMTrainer(mixture_backend(target, ref, config), config)
    prompts = ["0"] * noise.shape[0]
    seconds, at = 0.0, {}

    def distance() -> tuple[float, torch.Tensor]:
        samples = trainer.sample(prompts, noise=noise).cpu()
        return mx.sliced_wasserstein(samples, reference), samples

    def callback(tr, metrics):
        nonlocal seconds
        seconds += metrics["seconds"]
        if tr.step_count in CHECKPOINTS:
            at[tr.step_count] = distance()[0]
            log(f"{target} seed {config.seed} iteration {tr.step_count}: sliced W2 {at[tr.step_count]:.4f} "
                f"(teacher-50 {ref['figures']['d_teacher50']:.4f}; {seconds:.1f}s training)")

    trainer.train(config.iterations, callback)
    d_student, samples = distance()
    return {"d_student": d_student, "at": at, "seconds": seconds,
            "between_student": mx.between_share(spec, samples), "tv_student": mx.mode_weight_tv(spec, samples)}


def digits_run(config) -> tuple[dict, dict]:
    """(teacher figures, student figures) of run_toy_distillation with `config`'s fields as overrides."""
    from tdm_core.toy.experiment import digits_distill_config, run_toy_distillation

    base = digits_distill_config().to_dict()
    overrides = {k: v for k, v in config.to_dict().items() if v != base[k] and k != "iterations"}
    eval_every = 50 if config.iterations >= min(CHECKPOINTS) else 0
    result = run_toy_distillation(iterations=config.iterations, eval_every=eval_every, log=log, **overrides)
    at = {h["iteration"]: h["fd"] for h in result.history if h["iteration"] in CHECKPOINTS}
    teacher = {"d_teacher50": result.teacher_50["fd"], "d_teacher4": result.teacher_4["fd"]}
    return teacher, {"d_student": result.student["fd"], "at": at, "seconds": result.distill_seconds}


# The toy latent teachers of tdm_devkit/toy_latent_teacher.py (every latent element ±1 plus a little noise, the
# prompt sets the share of +1), distilled through TDM Distill's own runtime (nodes.distill_jobs.build_runtime) with the
# quality check's settings but the recipe's LoRA shape; --set overrides every DistillConfig field but the adapters'
# layout (their target modules, mode): lora_rank / lora_alpha go to TDM Distill's inputs of those names.
LATENT_TARGETS = ("sdxl", "flux", "sd3", "sd35")
_LORA_LAYOUT = ("lora_target_modules", "mode")


def _latent_samples(trainer, prompts, adapter: str, grid: list[int], solver: str, noise_seed: int) -> dict:
    """{prompt: samples} of `adapter` (student_solver.latent_draw, per prompt)."""
    from student_solver import latent_draw

    return {p: latent_draw(trainer, p, adapter, grid, solver, noise_seed) for p in prompts}


def latent_runs(family: str, overrides: dict, iterations: int, seeds: list[int],
                trace_every: int = 0) -> tuple[dict, dict]:
    """(teacher figures, {seed: student figures}) of a toy latent teacher, scored as tests/test_sdxl_flux_quality.py
    scores it: the 1-D Wasserstein distance of the element values of 128 samples per prompt to the teacher's own
    50-step samples (noise seed 11), summed over the two prompts; `floor` is a second 50-step draw (seed 12). The
    teacher's 4 steps use DDIM, the student the solver its LoRA records (its family's). `trace_every` N > 0: also
    each prompt's share of positive elements in the student's samples every N iterations ("trace")."""
    import torch
    from student_solver import REFERENCE_STEPS, latent_session, teacher_reference

    from tdm_core import presets

    teacher, runs, reference = None, {}, None
    learned = {k: v for k, v in overrides.items() if k not in _LORA_LAYOUT}
    for seed in seeds:
        session, toy = latent_session(family, iterations, seed, learned)
        trainer = session.trainer
        solver = presets.student_solver(trainer.config.sampler_preset, trainer.backend.parametrisation)
        grid = list(trainer.grid)
        if reference is None:
            reference = {p: teacher_reference(trainer, p) for p in toy.PROMPTS}
        distance = functools.partial(_latent_distance, toy, reference)
        if teacher is None:
            four = _latent_samples(trainer, toy.PROMPTS, "teacher", grid, "ddim", 7)
            # the teacher's 50 steps of DDIM (Euler) from the students' noise: how far that sampler is from teacher-50
            euler50 = _latent_samples(trainer, toy.PROMPTS, "teacher", trainer.sample_grid(REFERENCE_STEPS), "ddim",
                                      7)
            teacher = {"d_teacher4": distance(four), "d_teacher50_ddim": distance(euler50),
                       "floor": distance({p: teacher_reference(trainer, p, floor=True) for p in toy.PROMPTS}),
                       "shares": {"teacher50": _positive_shares(reference), "teacher4": _positive_shares(four)},
                       "moments": {"teacher50": _moments(reference), "teacher4": _moments(four)}}
        seconds, at, trace, spread_trace, drawn = 0.0, {}, {}, {}, (None, None)
        with torch.inference_mode(False), torch.enable_grad():
            while trainer.step_count < iterations:
                seconds += session.step()["seconds"]
                step = trainer.step_count
                traced = trace_every and step % trace_every == 0
                if not (traced or step in CHECKPOINTS):
                    continue
                # one draw of the student's samples (fixed noise) serves the trace, the checkpoint and the end
                drawn = (step, _latent_samples(trainer, toy.PROMPTS, "student", grid, solver, 7))
                if traced:
                    shares, spreads = _positive_shares(drawn[1]), _spreads(drawn[1], reference)
                    trace[step] = [round(shares[p], 4) for p in toy.PROMPTS]
                    spread_trace[step] = [round(spreads[p], 4) for p in toy.PROMPTS]
                if step in CHECKPOINTS:
                    at[step] = distance(drawn[1])
                    log(f"{family} seed {seed} iteration {step}: W1 to teacher-50 {at[step]:.4f} "
                        f"(teacher-4 {teacher['d_teacher4']:.4f})")
        last, student = drawn
        if last != trainer.step_count:  # the last iteration was neither traced nor a checkpoint
            student = _latent_samples(trainer, toy.PROMPTS, "student", grid, solver, 7)
        # the same student through the DDIM step it was trained with (its rollout: what TDM matched to the teacher)
        rollout = student if solver == "ddim" else _latent_samples(trainer, toy.PROMPTS, "student", grid, "ddim", 7)
        runs[seed] = {"d_student": distance(student), "at": at, "seconds": seconds,
                      "d_student_ddim": distance(rollout), "moments_ddim": _moments(rollout),
                      "shares": _positive_shares(student), "trace": trace, "spread_trace": spread_trace,
                      "moments": _moments(student),
                      "d_moments_matched": _moments_matched_distance(toy, reference, student)}
    return teacher, runs


def _latent_distance(toy, reference: dict, samples: dict) -> float:
    return sum(toy.value_distance(samples[p], reference[p]) for p in toy.PROMPTS)


def _positive_shares(samples: dict) -> dict:
    """{prompt: the share of positive latent elements} (the prompt sets the share of +1 in the toy's data; in the
    trained teachers' near-Gaussian element values it is Φ(mean / std))."""
    return {p: float((s > 0).float().mean()) for p, s in samples.items()}


def _moments(samples: dict) -> dict:
    """{prompt: (mean, std) of the element values}, pooled over every element of every sample."""
    return {p: (float(s.double().mean()), float(s.double().std())) for p, s in samples.items()}


def _spreads(samples: dict, reference: dict) -> dict:
    """{prompt: std of the samples' element values / std of the reference's (teacher-50's)}."""
    return {p: float(s.double().std() / reference[p].double().std()) for p, s in samples.items()}


def _moments_matched_distance(toy, reference: dict, samples: dict) -> float:
    """The distance left once each prompt's element values are shifted and scaled to teacher-50's mean and std: what
    the student gets wrong beyond those two numbers per prompt (the shape of the value distribution)."""
    matched = {}
    for p, s in samples.items():
        s, r = s.double(), reference[p].double()
        matched[p] = (s - s.mean()) / s.std() * r.std() + r.mean()
    return _latent_distance(toy, reference, matched)


def summarise_latent(target: str, teacher: dict, runs: dict[int, dict]) -> dict:
    """A latent target's figures: the share of the teacher's 4-step distance the student removes (mean over seeds)."""
    d4 = teacher["d_teacher4"]
    shares = teacher["shares"]
    out = {f"{target}_{k}": round(v, 5) for k, v in teacher.items() if k not in ("shares", "moments")}
    # The mode weights: each prompt's share of positive elements, of teacher-50 (the reference draw), teacher-4 and the
    # students (mean over the seeds), and the students' gap to teacher-50 (mean over prompts and seeds)
    out[f"{target}_share_teacher50"] = {p: round(v, 4) for p, v in shares["teacher50"].items()}
    out[f"{target}_share_teacher4"] = {p: round(v, 4) for p, v in shares["teacher4"].items()}
    out[f"{target}_share_student"] = {p: round(sum(r["shares"][p] for r in runs.values()) / len(runs), 4)
                                      for p in shares["teacher50"]}
    gaps = [abs(r["shares"][p] - v) for r in runs.values() for p, v in shares["teacher50"].items()]
    out[f"{target}_share_gap"] = round(sum(gaps) / len(gaps), 4)
    if any(r["trace"] for r in runs.values()):
        out[f"{target}_share_trace"] = {str(seed): {str(i): v for i, v in r["trace"].items()} for seed, r in runs.items()}
        out[f"{target}_spread_trace"] = {str(seed): {str(i): v for i, v in r["spread_trace"].items()}
                                         for seed, r in runs.items()}
    # The first two moments of each prompt's element values: teacher-50's, and the others' spread (std) as a ratio of
    # teacher-50's and mean gap; then the students' distance once those two are matched (the shape's share of it)
    moments = teacher["moments"]

    def student_spread(key: str) -> dict:  # each prompt's std over teacher-50's, averaged over the seeds
        return {p: round(sum(r[key][p][1] for r in runs.values()) / len(runs) / m[1], 4)
                for p, m in moments["teacher50"].items()}

    out[f"{target}_mean_teacher50"] = {p: round(m[0], 4) for p, m in moments["teacher50"].items()}
    out[f"{target}_std_teacher50"] = {p: round(m[1], 4) for p, m in moments["teacher50"].items()}
    out[f"{target}_spread_teacher4"] = {p: round(m[1] / moments["teacher50"][p][1], 4)
                                        for p, m in moments["teacher4"].items()}
    out[f"{target}_spread_student"] = student_spread("moments")
    out[f"{target}_mean_student"] = {p: round(sum(r["moments"][p][0] for r in runs.values()) / len(runs), 4)
                                     for p in moments["teacher50"]}
    mean_gaps = [abs(r["moments"][p][0] - m[0]) for r in runs.values() for p, m in moments["teacher50"].items()]
    out[f"{target}_mean_gap"] = round(sum(mean_gaps) / len(mean_gaps), 4)
    out[f"{target}_moments_matched_to_floor"] = round(
        sum(r["d_moments_matched"] for r in runs.values()) / len(runs) / teacher["floor"], 3)
    mean = sum(r["d_student"] for r in runs.values()) / len(runs)
    out[f"{target}_d_student"] = round(mean, 5)
    out[f"{target}_removed"] = round(1 - mean / d4, 4)
    out[f"{target}_ratio_to_floor"] = round(mean / teacher["floor"], 3)
    out[f"{target}_teacher4_to_floor"] = round(d4 / teacher["floor"], 3)
    out[f"{target}_teacher50_ddim_to_floor"] = round(teacher["d_teacher50_ddim"] / teacher["floor"], 3)
    out[f"{target}_ratio_to_floor_ddim"] = round(
        sum(r["d_student_ddim"] for r in runs.values()) / len(runs) / teacher["floor"], 3)
    out[f"{target}_spread_student_ddim"] = student_spread("moments_ddim")
    out[f"{target}_removed_by_seed"] = {str(s): round(1 - r["d_student"] / d4, 4) for s, r in runs.items()}
    steps = sorted(set.intersection(*(set(r["at"]) for r in runs.values())))
    out[f"{target}_removed_at"] = {str(i): round(1 - sum(r["at"][i] for r in runs.values()) / len(runs) / d4, 4)
                                   for i in steps}
    out[f"{target}_seconds"] = round(sum(r["seconds"] for r in runs.values()) / len(runs), 1)
    return out


def summarise(target: str, teacher: dict, runs: dict[int, dict]) -> dict:
    """The figures of one target, student figures averaged over the seeds."""
    d50 = teacher["d_teacher50"]
    out = {f"{target}_{k}": round(v, 5) for k, v in teacher.items()}

    def mean(key: str) -> float:
        return sum(r[key] for r in runs.values()) / len(runs)

    out[f"{target}_d_student"] = round(mean("d_student"), 5)
    out[f"{target}_ratio"] = round(mean("d_student") / d50, 4)
    out[f"{target}_ratio_by_seed"] = {str(s): round(r["d_student"] / d50, 4) for s, r in runs.items()}
    steps = sorted(set.intersection(*(set(r["at"]) for r in runs.values())))
    out[f"{target}_ratio_at"] = _ratio_at({i: sum(r["at"][i] for r in runs.values()) / len(runs) for i in steps}, d50)
    for key in ("between_student", "tv_student"):
        if key in next(iter(runs.values())):
            out[f"{target}_{key}"] = round(mean(key), 5)
    out[f"{target}_seconds"] = round(mean("seconds"), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--targets", default="mix2d,mix16d,digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a DistillConfig field for every target, e.g. --set adam_betas=[0.9,0.999]")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default: 0, or --set seed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace-every", type=int, default=0, metavar="N",
                        help="latent targets: each prompt's share of positive elements every N iterations")
    args = parser.parse_args()

    import torch

    from tdm_core.distill import ConfigError
    from tdm_core.toy.mixture_spec import MIXTURES

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    known = [*sorted(MIXTURES), *(m + suffix for suffix in (LEARNED, FEATURES) for m in sorted(MIXTURES)), "digits",
             *LATENT_TARGETS]
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        print(f"error: unknown target(s) {unknown}; use {known}", file=sys.stderr)
        return 2
    try:
        overrides = parse_sets(args.set)
        iterations = int(overrides.pop("iterations", args.iterations))
        set_seed = overrides.pop("seed", 0)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [set_seed]
        toy_targets = [t for t in targets if t not in LATENT_TARGETS] or ["mix2d"]  # also checks the --set keys
        configs = {seed: build_configs(toy_targets, overrides, iterations, seed) for seed in seeds}
    except (ConfigError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))

    line = {"bench": "pace", "iterations": iterations, "seeds": seeds}
    if any(t not in LATENT_TARGETS for t in targets):
        line["recipe"] = recipe(configs[seeds[0]][toy_targets[0]])
    if any(t in LATENT_TARGETS for t in targets):  # TDM Distill's inputs, then the --set fields on its config
        from student_solver import LATENT_SETTINGS

        line["latent_recipe"] = {k: LATENT_SETTINGS[k] for k in ("learning_rate", "batch_size", "cfg")}
        line["latent_recipe"].update({k: v for k, v in overrides.items() if k not in _LORA_LAYOUT})
    ratios, between_ok = [], True
    for target in targets:
        if target == "digits":
            runs, teacher = {}, None
            for seed in seeds:
                teacher, runs[seed] = digits_run(configs[seed][target])
        elif target in LATENT_TARGETS:
            line.update(summarise_latent(target, *latent_runs(target, overrides, iterations, seeds, args.trace_every)))
            continue
        else:
            ref = learned_reference(target) if target.endswith(LEARNED) else mixture_reference(base_mixture(target))
            teacher = ref["figures"]
            log(f"{target}: teacher-50 {teacher['d_teacher50']:.4f}, teacher-4 {teacher['d_teacher4']:.4f}, "
                f"floor {teacher['floor']:.4f} (sliced W2 to the data)")
            runs = {seed: mixture_student(target, ref, configs[seed][target]) for seed in seeds}
        figures = summarise(target, teacher, runs)
        line.update(figures)
        ratios.append(figures[f"{target}_ratio"])
        if base_mixture(target) in MIXTURES:
            between_ok &= figures[f"{target}_between_student"] <= 2 * figures[f"{target}_between_teacher50"]
    line["worst_ratio"] = max(ratios) if ratios else None
    line["goal_met"] = bool(ratios and line["worst_ratio"] <= GOAL_RATIO and between_ok)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
