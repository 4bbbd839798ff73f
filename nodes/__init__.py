"""Thin ComfyUI adapters over tdm_core: sockets, tooltips, progress and cancel, ComfyUI object conversion.

Each module lists its node classes in `NODES`; this list is what the extension registers. Node ids are part of
every saved workflow: never rename one once shipped.
"""

from __future__ import annotations

from . import job_lora, lora_loader, sampling, trainer, video

NODE_CLASSES: list = [*sampling.NODES, *lora_loader.NODES, *video.NODES, *trainer.NODES, *job_lora.NODES]
