"""The TDM method, independent of ComfyUI: schedules and grids, few-step solvers, LoRA reading/writing, distillation.

Nothing in this package imports ComfyUI, so it runs headless (`python -m tdm_core...`), under torchrun and in tests.
"""

__version__ = "0.1.0"
