"""Installing the pack as ComfyUI-Manager does: a copy in custom_nodes/, `pip install -r requirements.txt`, start."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import comfy_runtime
from harness.server import ComfyServer, make_base_directory

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
    shutil.copytree(REPO, base / "custom_nodes" / "comfyui-tdm", ignore=shutil.ignore_patterns(*NOT_SHIPPED))
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


# Where users put a clone (README: `git clone … comfyui-tdm`; ComfyUI-Manager: custom_nodes/<repo name>). None of
# these folder names is a Python identifier, which once made pytest import the pack's own __init__.py as a test
# module and error every test (tests/conftest.py now collects the repository root as a plain folder).
CLONE_FOLDERS = {
    "hyphen_and_spaces": "my packs/comfyui-tdm copy",  # a Finder-style copy of the README's clone
    "inside_custom_nodes": "ComfyUI/custom_nodes/comfyui-tdm",
}
# A few real tests, run from the copy: the docs scan, the TDM LoRA Loader on a real peft file, and sampler parity
# with diffusers, all through the copy's own pack (imported from its folder as ComfyUI imports it).
REAL_TESTS_FROM_THE_COPY = (
    "tests/test_docs.py::test_every_cited_docs_path_exists_with_its_section",
    "tests/test_lora_node.py::test_auto_strength_is_the_sd3_preset_and_manual_overrides",
    "tests/test_sampler_parity.py::test_sd35_tdm_nodes_equal_the_diffusers_recipe",
)


def _collected_files(output: str) -> set[str]:
    return {line.split("::", 1)[0] for line in output.splitlines() if line.startswith("tests/") and "::" in line}


def _pytest(cwd: Path, comfyui: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TDM_COMFYUI_DIR=str(comfyui))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


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


@pytest.mark.parametrize("layout", list(CLONE_FOLDERS))
def test_the_suite_runs_from_a_clone_in_any_folder(tmp_path, layout):
    clone = tmp_path / CLONE_FOLDERS[layout]
    comfyui = (_comfyui_tree_around(tmp_path / "ComfyUI") if layout == "inside_custom_nodes"
               else comfy_runtime.comfyui_dir())
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(*NOT_SHIPPED))

    if layout == "inside_custom_nodes":  # a few real tests (each run costs a ComfyUI start-up)
        run = _pytest(clone, comfyui, "-q", *REAL_TESTS_FROM_THE_COPY)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert re.search(rf"\b{len(REAL_TESTS_FROM_THE_COPY)} passed\b", run.stdout), run.stdout[-2000:]
    else:  # the whole suite collects there, every test module with its tests
        collected = _pytest(clone, comfyui, "--collect-only", "-q")
        assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
        modules = {str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")}
        assert modules and _collected_files(collected.stdout) == modules, collected.stdout[-3000:]
