"""Installing the pack as ComfyUI-Manager does: a copy in custom_nodes/, `pip install -r requirements.txt`, start."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tdm_devkit import comfy_runtime
from tdm_devkit.server import ComfyServer, make_base_directory

REPO = Path(__file__).resolve().parents[1]
NOT_SHIPPED = (".git", ".venv", ".comfyui", ".comfyui-upstream", ".browser", "test-artifacts", "demo-output", "__pycache__",
               ".pytest_cache", ".ruff_cache")


def test_requirements_never_touch_torch():
    names = [re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower()
             for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)
    assert all(not re.search(r"==", line) for line in (REPO / "requirements.txt").read_text().splitlines()
               if not line.startswith("#")), "lower bounds only"
    # What pip would do with them in this environment (CUDA-torch users included): nothing to torch.
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "-r",
         str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=300, check=True)
    planned = {item["metadata"]["name"].lower() for item in json.loads(report.stdout).get("install", [])}
    assert not {"torch", "torchvision", "torchaudio"} & planned, planned


def test_fresh_install_starts_with_every_tdm_node(tmp_path, pack):
    torch_before = torch.__version__
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", str(REPO / "requirements.txt")],
                   check=True, timeout=600, capture_output=True)
    version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == torch_before

    base = make_base_directory(tmp_path / "comfy", install_pack=False)
    _shipped_copy(base / "custom_nodes" / "comfyui-tdm")
    with ComfyServer(base) as server:
        info = server.object_info()
        log = server.log_tail(400_000)
    import asyncio

    expected = {node.GET_SCHEMA().node_id for node in asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())}
    assert expected and expected <= set(info), expected - set(info)
    pack_lines = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/comfyui-tdm")]
    assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), pack_lines


def test_registry_metadata_is_complete():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = config["project"], config["tool"]["comfy"]
    assert project["name"] == "comfyui-tdm" and project["version"] and project["description"] and project["license"]
    assert not {"torch", "torchvision", "torchaudio"} & {re.split(r"[<>=!~ \[;]", d)[0] for d in project["dependencies"]}
    for key in ("PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"):
        assert comfy.get(key), key
    assert (REPO / comfy["Icon"].rsplit("/main/", 1)[1]).is_file()  # the icon the registry shows is committed
    assert all((REPO / folder).is_dir() for folder in comfy["includes"])


def _shipped_copy(destination: Path) -> Path:
    """This repository as a user's clone or ComfyUI-Manager's install holds it (no environments, caches, artefacts)."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    return destination


# Where users put a clone (README: `git clone … comfyui-tdm`; ComfyUI-Manager: custom_nodes/<repo name>). None of
# these folder names is a Python identifier, which once made pytest import the pack's own __init__.py as a test
# module and error every test (tests/conftest.py now collects the repository root as a plain folder).

# A few real tests, run from the copy: the docs scan, the TDM LoRA Loader on a real peft file, and sampler parity
# with diffusers, all through the copy's own pack (imported from its folder as ComfyUI imports it). They are picked
# by name from the whole suite, so the same run collects every test module there too. Running is what matters:
# pytest imports a test package's __init__.py when it sets the package up, not when it collects it.
REAL_TESTS_FROM_THE_COPY = (
    "test_every_cited_docs_path_exists_with_its_section",
    "test_auto_strength_is_the_sd3_preset_and_manual_overrides",
    "test_sd35_tdm_nodes_equal_the_diffusers_recipe",
)


def _run_real_tests_from(clone: Path, comfyui: Path) -> None:
    env = dict(os.environ, TDM_COMFYUI_DIR=str(comfyui))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests",
                          "-k", " or ".join(REAL_TESTS_FROM_THE_COPY)],  # each run costs a ComfyUI start-up
                         cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(rf"\b{len(REAL_TESTS_FROM_THE_COPY)} passed, \d+ deselected\b", run.stdout), run.stdout[-2000:]


def _comfyui_tree_around(tree: Path) -> Path:
    """A ComfyUI tree at `tree` whose entries are this run's ComfyUI (linked), with an empty custom_nodes/ of its
    own: the layout of a user's install, where the pack is cloned into ComfyUI/custom_nodes/."""
    source = comfy_runtime.comfyui_dir()
    tree.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "custom_nodes":
            (tree / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (tree / "custom_nodes").mkdir()
    return tree


def test_the_suite_runs_from_a_hyphenated_folder_with_spaces(tmp_path):
    # a Finder-style copy of the README's clone
    _run_real_tests_from(_shipped_copy(tmp_path / "my packs" / "comfyui-tdm copy"), comfy_runtime.comfyui_dir())


def test_the_suite_runs_from_custom_nodes_inside_a_comfyui_tree(tmp_path):
    comfyui = _comfyui_tree_around(tmp_path / "ComfyUI")
    _run_real_tests_from(_shipped_copy(comfyui / "custom_nodes" / "comfyui-tdm"), comfyui)
