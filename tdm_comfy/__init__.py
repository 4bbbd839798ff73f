"""ComfyUI as a library, for the headless trainer: a teacher built from the model files a ComfyUI install holds, by
the same loader nodes and the same job code (`nodes/distill_jobs.py`) as TDM Distill, so that a run under `python -m
tdm_core.distill` or `torchrun` trains what the node would.

`tdm_core` never imports ComfyUI; this package is the one place outside the pack's `nodes/` that does, and only when
a run's config names `teacher.factory = "tdm_comfy.teacher:make_backend"`.
"""
