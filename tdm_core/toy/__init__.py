"""Small teacher tasks that ship with the package: the demo's and the benchmark's offline distillation problem.

- `load_or_train_teacher(DIGITS_TEACHER)`: a class-conditional ε-prediction MLP on scikit-learn's 8x8 digits,
  trained once on CPU and cached; `GMM_TEACHER` is a 2-D Gaussian-mixture teacher that trains in seconds (tests).
- `ToyBackend(teacher)`: the `tdm_core.distill` backend (student and fake score as peft LoRA adapters on the frozen
  teacher); `make_backend` is the CLI factory (`teacher = {"factory": "tdm_core.toy:make_backend"}`).
- `DigitsMetric` / `GMMMetric`: Fréchet distance on a fixed feature map and a fixed classifier's accuracy
  (see `tdm_core.toy.metrics` for the exact definition); `evaluate` samples with fixed counts and seeds.
"""

from .backend import ToyBackend, class_prompts, make_backend, prompt_to_label
from .cache_lock import cache_dir
from .data import GaussianMixture2D, digits_to_uint8, load_digits_tensor
from .metrics import DigitsMetric, GMMMetric, frechet_distance, load_digits_classifier
from .networks import LORA_TARGET_MODULES, ToyEpsNet
from .sampling import ddim_sample, uniform_grid, vp_alphas_cumprod
from .teacher import (
    DIGITS_TEACHER,
    GMM_TEACHER,
    ToyTeacher,
    ToyTeacherConfig,
    load_or_train_teacher,
)

__all__ = [
    "DIGITS_TEACHER",
    "GMM_TEACHER",
    "LORA_TARGET_MODULES",
    "DigitsMetric",
    "GMMMetric",
    "GaussianMixture2D",
    "ToyBackend",
    "ToyEpsNet",
    "ToyTeacher",
    "ToyTeacherConfig",
    "cache_dir",
    "class_prompts",
    "ddim_sample",
    "digits_to_uint8",
    "frechet_distance",
    "load_digits_classifier",
    "load_digits_tensor",
    "load_or_train_teacher",
    "make_backend",
    "prompt_to_label",
    "uniform_grid",
    "vp_alphas_cumprod",
]
