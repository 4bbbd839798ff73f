"""The toy video teachers (tdm_core/toy/video.py): does a 4-step TDM student beat the teacher's own 4 steps on per-frame
quality AND consistency across frames? Prints ONE JSON line.

    .venv/bin/python bench/video_toy.py [--teacher exact|learned] [--iterations 300] [--residual clip|frames]
                                        [--set key=json ...]

--teacher exact (default): the analytic ε plus a frozen residual (--residual) carrying the LoRAs; learned: the
network trained on the toy clips (tdm_core.toy.video.LEARNED_VIDEO_TEACHER, trained on first use, ~3–6 min on 2 CPU
cores, then cached), the LoRAs on its own linears.
Samples: 1024 clips (256 per prompt "0".."3"), fixed N(0, I) noise (torch.Generator seed 0), the same for every
sampler: teacher50 / teacher4 = deterministic DDIM with the teacher's ε on 999, 979, …, 19 / 999, 749, 499, 249;
student = the TDM student's 4 steps (TDMTrainer.sample, trained by TDMTrainer on tdm_core.toy.video.VideoBackend).
data = 1024 fresh exact clips (seed 4321), the floor. Reference: 8192 exact clips (seed 1234).

Figures per sampler s in data, teacher50, teacher4, student (tdm_core.toy.video.video_scores):
  <s>_frame_w2 (lower is better: per-frame quality), <s>_frame_on_mode, <s>_track_consistent (higher is better:
  the share of clips whose per-frame positions follow the prompt's motion), <s>_motion_residual, <s>_clip_w2;
  student_at = {iteration: {frame_w2, track_consistent, clip_w2}} at 100, 200, 300;
  beats_teacher4 = {figure: bool} for frame_w2, clip_w2 and track_consistent; seconds = training time;
  teacher (exact | learned), residual (exact) or teacher_cached / teacher_train_seconds (learned).
Time on 2 CPU cores: 300 iterations train in ~45 s (exact) / ~200 s (learned, measured with the cores shared),
sampling and scoring ~40 s more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLES = 1024
REFERENCE = 8192
CHECKPOINTS = (100, 200, 300)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--residual", default="clip", choices=("clip", "frames"))
    parser.add_argument("--teacher", default="exact", choices=("exact", "learned"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from tdm_core.distill import ConfigError, TDMTrainer
    from tdm_core.toy import video
    from tdm_core.toy.backend import adapter_settings

    overrides = {}
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    try:
        config = video.video_distill_config(iterations=args.iterations, **overrides).validate(num_timesteps=1000)
    except (ConfigError, TypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    spec = video.TOY_VIDEO
    labels = video.balanced_labels(spec, SAMPLES)
    ref_labels = video.balanced_labels(spec, REFERENCE)
    reference = spec.sample(ref_labels, torch.Generator().manual_seed(1234))
    noise = torch.randn(SAMPLES, *spec.shape, generator=torch.Generator().manual_seed(0))

    def score(clips):
        return video.video_scores(spec, clips, labels, reference, ref_labels)

    learned = video.load_or_train_video_teacher(log=log) if args.teacher == "learned" else None
    line = {"bench": "video_toy", "teacher": args.teacher, "iterations": config.iterations,
            "spec": {"frames": spec.frames, "side": spec.side, "prompts": spec.classes, "std": spec.std}}
    if learned is None:
        line["residual"] = args.residual
    else:
        line.update(teacher_cached=learned.from_cache, teacher_train_seconds=round(learned.train_seconds, 1))
    scores = {"data": score(spec.sample(labels, torch.Generator().manual_seed(4321))),
              "teacher50": score(video.teacher_samples(spec, noise, labels, 50, learned)),
              "teacher4": score(video.teacher_samples(spec, noise, labels, 4, learned))}
    log(f"teacher50 {scores['teacher50']}\nteacher4 {scores['teacher4']}")
    backend = video.VideoBackend(spec, residual=args.residual, learned=learned, **adapter_settings(config))
    trainer = TDMTrainer(backend, config)
    prompts = [str(int(k)) for k in labels]
    seconds, at = 0.0, {}

    def callback(tr, metrics):
        nonlocal seconds
        seconds += metrics["seconds"]
        if tr.step_count in CHECKPOINTS and tr.step_count < config.iterations:
            s = score(trainer.sample(prompts, noise=noise).cpu())
            at[str(tr.step_count)] = {k: round(s[k], 4) for k in ("frame_w2", "track_consistent", "clip_w2")}
            log(f"iteration {tr.step_count}: {at[str(tr.step_count)]}")

    trainer.train(config.iterations, callback)
    scores["student"] = score(trainer.sample(prompts, noise=noise).cpu())
    at[str(config.iterations)] = {k: round(scores["student"][k], 4) for k in ("frame_w2", "track_consistent", "clip_w2")}
    for name, figures in scores.items():
        line.update({f"{name}_{k}": round(v, 4) for k, v in figures.items()})
    student, teacher4 = scores["student"], scores["teacher4"]
    line["student_at"] = at
    line["beats_teacher4"] = {"frame_w2": student["frame_w2"] < teacher4["frame_w2"],
                              "clip_w2": student["clip_w2"] < teacher4["clip_w2"],
                              "track_consistent": student["track_consistent"] > teacher4["track_consistent"]}
    line["seconds"] = round(seconds, 1)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
