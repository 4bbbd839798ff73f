"""The main demo: distill a 4-step TDM student from a toy digits teacher on the CPU, in a few minutes.

    python -m tdm_core.demo [--output demo-output] [--iterations 500] [--eval-every 50] [--threads 1]

1. trains the class-conditional 8x8-digits teacher (about three minutes on 2 cores; cached under ~/.cache/comfyui-tdm, or
   $TDM_TOY_CACHE, so later runs reuse it),
2. scores the teacher's own 50-step and 4-step DDIM samples (cfg 1, i.e. no guidance: the recipe in tdm_core.toy.experiment),
3. distills a 4-step student with TDM (two peft LoRA adapters — student and fake score — on the frozen teacher),
   scoring it every `--eval-every` iterations,
4. writes `figure.png` (teacher 50-step | teacher 4-step | TDM 4-step samples, 8 per class, and the Fréchet distance
   over iterations), `metrics.json` and the student LoRA `student_lora.safetensors` into the output folder.

Metric: Fréchet distance between 2000 generated digits (200 per class, fixed noise seed 0) and all 1797 real
digits, on their 64 pixels clamped to [-1, 1] (secondary: on the penultimate features of a fixed classifier);
accuracy: that classifier's agreement with the requested class. Exact definitions: `tdm_core.toy.metrics`. No ComfyUI, network access or GPU needed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tdm_core.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo-output", help="output folder (default: demo-output/)")
    parser.add_argument("--iterations", type=int, default=500, help="TDM iterations (default 500)")
    parser.add_argument("--eval-every", type=int, default=50, help="score the student every N iterations")
    parser.add_argument("--cache-dir", default=None, help="toy teacher cache (default $TDM_TOY_CACHE or "
                                                          "~/.cache/comfyui-tdm)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the toy's matrices are small, and on a shared 2-core "
                             "machine more threads contend and run slower)")
    return parser.parse_args(argv)


def write_outputs(result, out: Path, total_seconds: float) -> dict:
    from tdm_core.distill import export_student_lora
    from tdm_core.toy.figure import demo_figure, digits_grid, line_plot

    out.mkdir(parents=True, exist_ok=True)
    k = result.distill_config.steps
    rows = 8
    panels = [
        (f"teacher 50-step  FD {result.teacher_50['fd']:.2f}", digits_grid(result.samples["teacher_50"], result.labels, rows)),
        (f"teacher {k}-step  FD {result.teacher_4['fd']:.2f}", digits_grid(result.samples["teacher_4"], result.labels, rows)),
        (f"TDM {k}-step  FD {result.student['fd']:.2f}", digits_grid(result.samples["tdm_4"], result.labels, rows)),
    ]
    its = [h["iteration"] for h in result.history]
    plot = line_plot(
        {f"TDM student, {k} steps": (its, [h["fd"] for h in result.history])},
        {"teacher 50-step": result.teacher_50["fd"], f"teacher {k}-step": result.teacher_4["fd"]},
        title="Frechet distance to the real digits (pixels; lower is better)", xlabel="TDM iteration", ylabel="FD",
    )
    caption = (f"toy 8x8 digits, CFG {result.distill_config.cfg} teacher; TDM {result.distill_config.iterations} "
               f"iterations in {result.distill_seconds:.0f}s on CPU; total run {total_seconds:.0f}s")
    figure_path = out / "figure.png"
    demo_figure(panels, plot, caption).save(figure_path)
    lora_path = export_student_lora(result.trainer, out / "student_lora.safetensors")
    metrics = {
        **result.bench_line(),
        "demo_seconds": round(total_seconds, 1),
        "teacher_train_seconds": round(result.teacher_train_seconds, 1),
        "eval_seconds": round(result.eval_seconds, 1),
        "teacher_50": result.teacher_50,
        "teacher_4": result.teacher_4,
        "tdm_4": result.student,
        "history": result.history,
        "teacher_config": asdict(result.teacher_config),
        "distill_config": result.distill_config.to_dict(),
        "metric": "fd: Fréchet distance on the 64 pixels (clamped to [-1, 1]) of 2000 samples (200 per class, "
                  "noise seed 0) vs all 1797 real digits; fd_clf: the same on the 64-d penultimate features of a "
                  "fixed digits classifier (seed 0); acc: that classifier's agreement with the requested class, "
                  "averaged over classes (tdm_core.toy.metrics)",
        "figure": str(figure_path),
        "student_lora": str(lora_path),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from tdm_core.toy.experiment import run_toy_distillation

    start = time.perf_counter()
    result = run_toy_distillation(iterations=args.iterations, eval_every=args.eval_every, cache_dir=args.cache_dir)
    total = time.perf_counter() - start
    metrics = write_outputs(result, Path(args.output), total)
    print(json.dumps({k: metrics[k] for k in ("fd_teacher_50", "fd_teacher_4", "fd_tdm_4", "acc_teacher_50",
                                              "acc_tdm_4", "iterations", "demo_seconds")}))
    print(f"figure: {metrics['figure']}\nmetrics: {Path(args.output) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
