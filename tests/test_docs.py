"""The project carries its own docs: every `docs/…` path the code cites exists (with the § it names), and every node
has a help page that the live server serves where the frontend looks for it."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = {".py", ".js", ".mjs", ".md", ".toml", ".sh", ".json", ".txt"}
SKIPPED_DIRS = {".git", ".venv", ".comfyui", ".comfyui-upstream", ".browser", "test-artifacts", "demo-output",
                "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
CITATION = re.compile(r"(?<![\w/.-])(docs/[\w./-]*\w)`?(?:\s*(§\d+))?")


def _project_files():
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO)
        if any(part in SKIPPED_DIRS for part in relative.parts) or not path.is_file():
            continue
        if path.suffix in SOURCE_SUFFIXES:
            yield path


def _citations() -> dict[tuple[str, str | None], list[str]]:
    found: dict = {}
    for path in _project_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                found.setdefault((match.group(1), match.group(2)), []).append(f"{path.relative_to(REPO)}:{number}")
    return found


def test_every_cited_docs_path_exists_with_its_section():
    citations = _citations()
    assert ("docs/tdm_method.md", "§2") in citations  # the scan finds what the code is known to cite
    missing = []
    for (cited, section), where in sorted(citations.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        if cited.startswith("docs/<") or "/<" in cited:
            continue
        target = REPO / cited
        # a path with a route-like suffix (docs/<Node>/en.md in URLs) is checked by the help-page test
        if not target.exists():
            missing.append(f"{cited} (cited at {where[0]})")
        elif section and not re.search(rf"^#+ {re.escape(section)}\b", target.read_text(), re.MULTILINE):
            missing.append(f"{cited} {section} (cited at {where[0]}): no such heading")
    assert missing == []


def test_no_citation_of_modules_that_do_not_exist():
    """Dotted module names cited in prose (tdm_core.<module> in backticks) name real modules."""
    pattern = re.compile(r"`(tdm_core(?:\.\w+)+)`")
    missing = []
    for path in _project_files():
        for name in pattern.findall(path.read_text(errors="replace")):
            parts = name.split(".")
            # a module, a package, or an attribute of one: some prefix must be a file or package
            if not any((REPO.joinpath(*parts[:n]).with_suffix(".py")).is_file() or REPO.joinpath(*parts[:n]).is_dir()
                       for n in range(len(parts), 1, -1)):
                missing.append(f"{name} in {path.relative_to(REPO)}")
    assert missing == []


def _node_ids(object_info) -> list[str]:
    return sorted(name for name, info in object_info.items() if info.get("python_module", "").endswith("comfyui-tdm"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


def test_every_node_has_a_help_page_served_where_the_frontend_asks(comfy_server, object_info):
    """The frontend fetches /extensions/<pack folder>/docs/<NodeId>/<locale>.md for a custom node's help."""
    node_ids = _node_ids(object_info)
    assert "TDMKSampler" in node_ids and "TDMLoraLoader" in node_ids
    problems = []
    for node_id in node_ids:
        page = REPO / "web" / "docs" / node_id / "en.md"
        if not page.is_file():
            problems.append(f"{node_id}: no web/docs/{node_id}/en.md")
            continue
        url = f"{comfy_server.url}/extensions/comfyui-tdm/docs/{node_id}/en.md"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                served = response.read().decode()
        except urllib.error.HTTPError as error:
            problems.append(f"{node_id}: {url} answered {error.code}")
            continue
        if served != page.read_text():
            problems.append(f"{node_id}: served text differs from the file")
        display_name = object_info[node_id]["display_name"]
        if not served.startswith(f"# {display_name}"):
            problems.append(f"{node_id}: the page's title is not the node's display name {display_name!r}")
        inputs = [name for section in ("required", "optional") for name in object_info[node_id]["input"].get(section, {})]
        undocumented = [name for name in inputs if f"**{name}**" not in served]
        if undocumented:
            problems.append(f"{node_id}: inputs not described: {undocumented}")
    assert problems == []


# About three lines of the frontend's tooltip box: the preset tooltip once ran to ten lines of internal names and
# covered the Run button. Detail belongs on the help page, which the test above checks names every input.
MAX_TOOLTIP = 240


def test_every_tooltip_is_short(object_info):
    long = []
    for node_id in _node_ids(object_info):
        for group in ("required", "optional"):
            for name, spec in object_info[node_id]["input"].get(group, {}).items():
                tooltip = spec[1].get("tooltip", "") if len(spec) > 1 and isinstance(spec[1], dict) else ""
                if len(tooltip) > MAX_TOOLTIP:
                    long.append(f"{node_id}.{name}: {len(tooltip)} characters")
    assert long == [], f"tooltips over {MAX_TOOLTIP} characters (move the detail to the help page): {long}"


def test_every_output_has_a_display_name_and_every_node_a_tdm_place(object_info):
    """Outputs are named for what they carry (not "STRING", "IMAGE"); nodes sit under TDM/ or, for the two that fill
    a SamplerCustom socket, in core's sampler/scheduler folders."""
    unnamed, misplaced = [], []
    for node_id in _node_ids(object_info):
        info = object_info[node_id]
        for kind, name in zip(info["output"], info["output_name"], strict=True):
            if not name or name == kind or name.upper() == name:
                unnamed.append(f"{node_id}: {kind} output named {name!r}")
        if not (info["category"].startswith("TDM/") or info["category"] in (
                "sampling/custom_sampling/samplers", "sampling/custom_sampling/schedulers")):
            misplaced.append(f"{node_id}: {info['category']}")
        if not info["display_name"].startswith("TDM "):
            misplaced.append(f"{node_id}: display name {info['display_name']!r} is not found by searching 'TDM'")
    assert unnamed == [] and misplaced == []


@pytest.mark.parametrize("document", ["web/docs/TDMDistillStart/en.md",
                                      "workflows/Distil your own 4-step LoRA (SD1.5 teacher).json"])
def test_distillation_docs_name_every_family_the_trainer_takes(document):
    """The help page and the distillation workflow's note once said "SD1.5 or SD3 family" long after SDXL and
    Flux-dev were added: both are checked against the trainer's own family table so they cannot fall behind again."""
    from tdm_core import families

    text = (REPO / document).read_text()
    missing = [family.label for family in families.distillable() if family.label not in text]
    assert missing == [], f"{document} does not name {missing}"


@pytest.mark.parametrize("node_id", ["TDMKSampler", "TDMScheduler"])
def test_the_preset_help_names_what_auto_picks_for_every_family(node_id):
    """TDM KSampler's help listed auto's picks for SD3, SD3.5, SD1.5 and CogVideoX long after SDXL and Flux-dev had
    presets (and its preset tooltip now points users to the help page): the `preset` bullet is checked against the
    presets themselves, family by family, so it cannot fall behind again."""
    from tdm_core import presets

    page = (REPO / "web" / "docs" / node_id / "en.md").read_text()
    bullet = re.search(r"^- \*\*preset\*\*:.*?(?=^- |^#|\Z)", page, re.S | re.M)
    assert bullet, f"{node_id}'s help page has no preset bullet"
    text = " ".join(bullet.group(0).split())  # the page wraps its lines anywhere
    families = dict.fromkeys(preset.family for preset in presets.PRESETS.values())
    missing = [f"{family} → {presets.presets_for_family(family)[0].name}" for family in families
               if f"→ `{presets.presets_for_family(family)[0].name}`" not in text]
    assert missing == [], f"{node_id} help: the auto list lacks {missing}"
