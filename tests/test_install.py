"""Installing the pack as ComfyUI-Manager does: a copy in custom_nodes/, `pip install -r requirements.txt`, start."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

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
