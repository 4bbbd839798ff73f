"""Makes a real ComfyUI importable as a library, on the CPU, inside the test process.

The tree comes from `scripts/setup.sh` (ComfyUI 0.3.75 in `.comfyui/`) or from `TDM_COMFYUI_DIR`, the one switch
that selects another runtime: a user's own checkout, or the upstream snapshot that set-up unpacks on developer
machines and CI (`.comfyui-upstream/ComfyUI`, see scripts/test.sh). Import this module before anything imports
`comfy`: it must set `args.cpu` before `comfy.model_management` is first imported, or ComfyUI tries to initialise
CUDA.

A tree may carry `.tdm-site-packages/`: packages that this tree pins differently from the shared environment (set-up
installs upstream's newer `comfyui-frontend-package` there, which would conflict with 0.3.75's). They go on
`sys.path` ahead of the environment's, here and in every server the harness starts, so the switch stays one variable.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = "comfyui_tdm"
SITE_PACKAGES_FOLDER = ".tdm-site-packages"


def comfyui_dir() -> Path:
    configured = os.environ.get("TDM_COMFYUI_DIR")
    path = Path(configured).expanduser().resolve() if configured else REPO_ROOT / ".comfyui"
    if not (path / "comfy" / "model_management.py").is_file():
        raise RuntimeError(
            f"No ComfyUI tree at {path}. Run `bash scripts/setup.sh` (extracts ComfyUI 0.3.75 into .comfyui/), "
            "or set TDM_COMFYUI_DIR to your own ComfyUI checkout."
        )
    return path


def extra_site_packages() -> Path | None:
    """The tree's own package folder (see the module docstring), or None when it has none (a user's checkout)."""
    path = comfyui_dir() / SITE_PACKAGES_FOLDER
    return path if path.is_dir() else None


def comfyui_version() -> str:
    """The `__version__ = "…"` assignment of the tree's comfyui_version.py, read as data (never executed)."""
    import ast

    tree = ast.parse((comfyui_dir() / "comfyui_version.py").read_text())
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in statement.targets):
            return ast.literal_eval(statement.value)
    raise ValueError(f"no __version__ in {comfyui_dir() / 'comfyui_version.py'}")


_bootstrapped = False


def _pin_configured_tree() -> None:
    """Makes a relative TDM_COMFYUI_DIR absolute in this process's environment: the servers and subprocesses the
    harness starts inherit it but run in other folders (a server's is the ComfyUI tree itself)."""
    if os.environ.get("TDM_COMFYUI_DIR"):
        os.environ["TDM_COMFYUI_DIR"] = str(comfyui_dir())


def bootstrap() -> Path:
    """Puts ComfyUI first on sys.path (its top-level `nodes.py` must win over this repo's `nodes/` package) and
    configures it for the CPU. The repo root goes last so that `import tdm_core` works as it does headless."""
    global _bootstrapped
    if _bootstrapped:
        return comfyui_dir()
    if "comfy.model_management" in sys.modules:
        # Already inside a running ComfyUI (the live server imports the test pack): it is configured by its argv.
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))
        _bootstrapped = True
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parents[1]
    _pin_configured_tree()
    root = comfyui_dir()
    packages = extra_site_packages()
    if packages is not None and str(packages) not in sys.path:
        sys.path.insert(0, str(packages))
    sys.path.insert(0, str(root))
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    import comfy.options

    comfy.options.enable_args_parsing(False)  # never parse pytest's argv
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # PyTorch attention makes ComfyUI's UNet bit-exact with diffusers' (the split default differs by ~1e-6).
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (initialises on CPU now that args are set)

    import nodes  # noqa: F401  (ComfyUI's nodes.py, so later `import nodes` never means this repo's package)

    _bootstrapped = True
    return root


def bootstrap_on_device() -> None:
    """For the benchmarks: ComfyUI on its own CUDA device when there is one (same attention choice as the tests),
    else the CPU set-up of `bootstrap()`."""
    import torch

    if not torch.cuda.is_available():
        bootstrap()
        return
    _pin_configured_tree()
    root = comfyui_dir()
    sys.path.insert(0, str(root))
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401

    import nodes  # noqa: F401  (ComfyUI's nodes.py before this repo's nodes/ package)


def load_pack():
    """Imports this repository as ComfyUI imports a custom-node pack (a package from its folder), once."""
    bootstrap()
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module
