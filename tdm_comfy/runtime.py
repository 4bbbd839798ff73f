"""Starting a ComfyUI tree as a library in this process, and importing this pack the way ComfyUI imports it.

ComfyUI configures itself when `comfy.model_management` is first imported (device, attention, memory mode) from its
command-line arguments; as a library its argument parsing is switched off and the few options a headless run may
set are put on `comfy.cli_args.args` before that import. Its top-level `nodes.py` must win over this pack's `nodes/`
package, so the tree goes first on `sys.path`; the pack is then imported as a package of its own name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tdm_core.distill.config import ConfigError

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = "comfyui_tdm"  # the package name this pack is imported under outside a ComfyUI server
# ComfyUI command-line switches a headless run may set (`teacher.comfyui_args`): the ones that change how the teacher
# computes, never what it is. Each is a boolean flag of ComfyUI's own argument parser.
ALLOWED_ARGS = ("cpu", "use_pytorch_cross_attention", "use_split_cross_attention", "use_quad_cross_attention",
                "disable_xformers", "force_fp32", "force_fp16")


def check_tree(comfyui_dir: str | Path, field: str = "teacher.comfyui_dir") -> Path:
    """The ComfyUI tree at `comfyui_dir`, or a ConfigError naming `field`."""
    if not comfyui_dir or not isinstance(comfyui_dir, (str, Path)):
        raise ConfigError(f"{field} must name your ComfyUI folder (the one holding main.py and models/)")
    path = Path(comfyui_dir).expanduser().resolve()
    if not (path / "comfy" / "model_management.py").is_file() or not (path / "nodes.py").is_file():
        raise ConfigError(f"{field} = {str(comfyui_dir)!r} is not a ComfyUI folder (no comfy/model_management.py "
                          "and nodes.py there)")
    return path


def check_args(options) -> dict[str, bool]:
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in options.items()):
        raise ConfigError("teacher.comfyui_args must be a table of ComfyUI switches set to true or false, e.g. "
                          "{ use_pytorch_cross_attention = true }")
    unknown = sorted(set(options) - set(ALLOWED_ARGS))
    if unknown:
        raise ConfigError(f"teacher.comfyui_args: {', '.join(unknown)} cannot be set for a headless run; "
                          f"allowed: {', '.join(ALLOWED_ARGS)}")
    return dict(options)


def start(comfyui_dir: Path, base_directory: Path | None = None, options: dict[str, bool] | None = None) -> Path:
    """Makes the ComfyUI tree importable and configured; returns the tree in use. In a process where ComfyUI is
    already running (a test process, or ComfyUI itself), that tree is used and must be the same one."""
    import torch

    loaded = sys.modules.get("comfy.model_management")
    if loaded is not None:
        running = Path(loaded.__file__).resolve().parents[1]
        if running != comfyui_dir:
            raise ConfigError(f"teacher.comfyui_dir is {comfyui_dir}, but this process already runs ComfyUI from "
                              f"{running}")
        return running
    sys.path.insert(0, str(comfyui_dir))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    # ComfyUI's device choice, as its own start makes it, except that a machine with no accelerator ComfyUI drives
    # (CUDA, Apple MPS, Intel XPU) must say --cpu or it fails at the first model
    xpu = getattr(torch, "xpu", None)
    args.cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                    or (xpu is not None and xpu.is_available()))
    if base_directory is not None:
        args.base_directory = str(base_directory)  # ComfyUI's --base-directory: models/ (and input/, output/) there
    for name, value in (options or {}).items():
        setattr(args, name, value)
    import comfy.model_management  # noqa: F401  (initialises the device with the arguments set above)
    import folder_paths

    extra = comfyui_dir / "extra_model_paths.yaml"
    if extra.is_file():  # the user's other model folders, as ComfyUI's main.py reads them at start
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(extra))
    del folder_paths
    import nodes  # noqa: F401  (ComfyUI's nodes.py, before this pack's nodes/ can be looked up)

    return comfyui_dir


def load_pack():
    """This pack, imported as ComfyUI imports a custom-node pack (a package from its folder), once."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE_NAME]
        raise
    return module
