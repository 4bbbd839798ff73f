"""What the registry and ComfyUI-Manager see: registry fields, model entries, what the archive leaves out, the
install line, and no dynamic code execution (comfy node validate's S102)."""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import build_workflows  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_registry_fields_are_filled():
    project = PYPROJECT["project"]
    urls = project["urls"]
    for key in ("Repository", "Documentation", "Issues"):
        assert urls.get(key, "").startswith("https://"), key
    classifiers = project["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    assert any(c.startswith("Environment :: GPU :: ") for c in classifiers)
    assert set(PYPROJECT["tool"]["comfy"]["includes"]) >= {"web", "workflows", "docs"}


def test_registry_models_are_the_presets_downloads():
    listed = {(m["location"], m["model_url"]) for m in PYPROJECT["tool"]["comfy"]["Models"]}
    expected = {(f"/{folder}/{name}", url) for name, (url, folder) in build_workflows.downloads().items()}
    assert listed == expected


def test_the_product_never_imports_the_development_kit():
    """tdm_devkit is left out of the registry archive (.comfyignore), so nothing a user's install runs may import it."""
    product = [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py"), *(REPO / "tdm_core").rglob("*.py")]
    importers = []
    for path in product:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "tdm_devkit" for name in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers == []


def test_comfyignore_keeps_developer_tooling_out_and_the_pack_in():
    patterns = [line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or (p.endswith("/") and path.startswith(p)) for p in patterns)

    for path in ("tests/test_docs.py", "tdm_devkit/twins.py", "bench/sampling.py", "scripts/setup.sh", ".ci/run"):
        assert ignored(path), path
    for path in ("__init__.py", "nodes/sampling.py", "tdm_core/presets.py", "web/tdm_jobs.js",
                 "web/docs/TDMKSampler/en.md", "workflows/SD3 Medium in 4 steps (TDM LoRA).json", "docs/tdm_method.md",
                 "pyproject.toml", "requirements.txt", "LICENSE", "README.md"):
        assert not ignored(path), path


def test_readme_install_line_is_real():
    readme = (REPO / "README.md").read_text()
    repository = PYPROJECT["project"]["urls"]["Repository"]
    assert f"git clone {repository}" in readme
    assert "<this repository>" not in readme


def test_no_exec_or_eval_in_the_project():
    """`comfy node validate` flags exec/eval (ruff S102/S307) anywhere in the archive's source, tests included."""
    calls = []
    for path in REPO.rglob("*.py"):
        relative = path.relative_to(REPO)
        if relative.parts[0] in {".venv", ".comfyui", ".comfyui-upstream", ".browser"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                calls.append(f"{relative}:{node.lineno}")
    assert calls == []


def test_every_node_is_in_a_tdm_category_or_a_core_socket_folder():
    text = (REPO / "nodes" / "categories.py").read_text()
    values = re.findall(r'^[A-Z_]+ = "([^"]+)"', text, re.MULTILINE)
    assert values and all(v.startswith("TDM/") or v.startswith("sampling/custom_sampling/") for v in values)


def _core_template_downloads() -> dict[tuple[str, str], set[str]]:
    """(model folder, file name) → the URLs ComfyUI's own templates (comfyui-workflow-templates, installed with
    ComfyUI) download it from, read from their `properties.models` entries."""
    import importlib.util
    import json

    found: dict[tuple[str, str], set[str]] = {}
    for package in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_video",
                    "comfyui_workflow_templates_core"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for path in Path(next(iter(spec.submodule_search_locations))).glob("templates/*.json"):
            try:
                workflow = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            nodes = workflow.get("nodes", []) if isinstance(workflow, dict) else []
            for node in nodes:
                for entry in (node.get("properties") or {}).get("models") or []:
                    if isinstance(entry, dict) and {"name", "url", "directory"} <= set(entry):
                        url = entry["url"].removesuffix("?download=true")
                        found.setdefault((entry["directory"], entry["name"]), set()).add(url)
    return found


def test_a_file_cores_templates_also_download_comes_from_the_same_place():
    """Where ComfyUI's own templates download a file this pack's workflows need, the pack links the same URL: core's
    links are the ungated mirrors a first-time user can fetch (Flux-dev's official repository is gated; the
    Comfy-Org mirror core uses is not)."""
    import pytest

    core = _core_template_downloads()
    if not core:
        pytest.skip("comfyui-workflow-templates is not installed in this runtime")
    shared = {(folder, name): url for name, (url, folder) in build_workflows.downloads().items()
              if (folder, name) in core}
    assert ("diffusion_models", "flux1-dev.safetensors") in shared  # the case that matters: a gated original
    differing = {key: (url, sorted(core[key])) for key, url in shared.items() if url not in core[key]}
    assert differing == {}
