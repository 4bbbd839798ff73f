"""comfyui-tdm: Trajectory Distribution Matching (TDM) for ComfyUI — few-step sampling, TDM LoRAs, distillation.

ComfyUI imports this folder as a package and calls `comfy_entrypoint()` (V3 node API). The method itself lives in
`tdm_core`, which imports nothing from ComfyUI so that it also runs headless and under torchrun; it is registered
under its own top-level name here so that the nodes and a headless run share one copy of it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PACK_DIR = Path(__file__).resolve().parent


def _register_tdm_core() -> None:
    core_dir = _PACK_DIR / "tdm_core"
    existing = sys.modules.get("tdm_core")
    if existing is not None:
        existing_dir = Path(existing.__file__).resolve().parent
        if existing_dir != core_dir:
            raise ImportError(
                f"Another module named 'tdm_core' is already loaded from {existing_dir}; comfyui-tdm needs its own "
                f"({core_dir}). Remove the other copy (a second install of this pack?) from custom_nodes."
            )
        return
    spec = importlib.util.spec_from_file_location(
        "tdm_core", core_dir / "__init__.py", submodule_search_locations=[str(core_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tdm_core"] = module
    spec.loader.exec_module(module)


_register_tdm_core()

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: E402

from .nodes import NODE_CLASSES, job_runtime  # noqa: E402

# The frontend extension (the "TDM jobs" sidebar panel), served at /extensions/<this folder>/.
WEB_DIRECTORY = "./web"


class TDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> TDMExtension:
    # The /tdm/jobs routes (the jobs panel's) join ComfyUI's server here, where ComfyUI loads the extension: both
    # runtimes call this entry point (0.3.75 never calls ComfyExtension.on_load).
    job_runtime.install()
    return TDMExtension()
