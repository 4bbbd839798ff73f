"""Offline TDM benchmark on the toy digits teacher; prints ONE JSON line.

    .venv/bin/python bench/distill.py [--iterations 500] [--threads 1]

{"bench": "distill", "fd_teacher_50", "fd_teacher_4", "fd_tdm_4", "acc_teacher_50", "acc_tdm_4", "iterations",
 "seconds", "nfe_per_iteration", ...}. FD: Fréchet distance between 2000 generated digits (200 per class, fixed
noise seed 0) and all 1797 real digits on their 64 pixels clamped to [-1, 1] (fd_clf_*: on the 64-d penultimate
features of a fixed classifier trained once with seed 0); acc: that classifier's agreement with the requested class,
averaged over classes (definitions in tdm_core/toy/metrics.py). Teacher: no CFG (cfg 1.0; see "cfg" in the line), DDIM on 999..19 (50 steps) or 999, 749, 499, 249 (4 steps); TDM student:
its own 4 steps on that grid, no CFG. "seconds" is the TDM training time (evaluation excluded).
Goals (issue 6): fd_tdm_4 ≤ 1.1 × fd_teacher_50 within ≤ 500 iterations; fd_teacher_4 ≥ 2 × fd_teacher_50.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, args.threads))
    from tdm_core.toy.experiment import run_toy_distillation

    result = run_toy_distillation(iterations=args.iterations, eval_every=0, cache_dir=args.cache_dir,
                                  log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(result.bench_line()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
