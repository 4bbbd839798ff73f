"""One home per model family: the registry (tdm_core/families.py) and its ComfyUI adapters are the only product code
that says which families exist; everything else asks them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tdm_core import families, presets, recipes

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "tdm_core/families.py"
# Strings equal to a family name that are not a family: preset ids (stored in workflows and LoRA headers; several
# presets are named after their family) and the CogVideoX pipe's socket name (saved in workflows).
NOT_A_FAMILY = {
    "tdm_core/presets.py": "the `name=` of each ModelPreset (a preset id)",
    "nodes/video.py": "the CogVideoX pipe socket, `cogvideox`",
}


def product_files() -> list[Path]:
    files = [REPO / "__init__.py"]
    for package in ("nodes", "tdm_core"):
        files += sorted((REPO / package).rglob("*.py"))
    return files


def family_literals(source: str, names=frozenset(families.FAMILIES), allowed: str = "") -> list[tuple[int, str]]:
    """(line, string) of every string constant in `source` that is a family's name; with `allowed` (a key of
    NOT_A_FAMILY), the preset ids or socket names that file may hold."""
    tree = ast.parse(source)
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if allowed == "tdm_core/presets.py" and isinstance(node, ast.keyword) and node.arg == "name":
            exempt.add(id(node.value))
        # a node's socket names are saved in workflows (the CogVideoX pipeline's socket is named after its family)
        if allowed.startswith("nodes/") and isinstance(node, ast.Call):
            if getattr(node.func, "attr", "") in ("Input", "Output"):
                exempt.update(id(arg) for arg in node.args[:1])
                exempt.update(id(k.value) for k in node.keywords if k.arg == "display_name")
        if allowed == "nodes/video.py" and isinstance(node, ast.Call) and getattr(node.func, "id", "") == "get_preset":
            exempt.update(id(arg) for arg in node.args)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in exempt]


def test_no_product_file_but_the_registry_names_a_family():
    found = []
    for path in product_files():
        relative = path.relative_to(REPO).as_posix()
        if relative == REGISTRY:
            continue
        found += [f"{relative}:{line}: {value!r}" for line, value in
                  family_literals(path.read_text(encoding="utf-8"), allowed=relative)]
    assert found == [], "ask tdm_core.families (or a family's adapter) instead of naming a family:\n" + "\n".join(found)


def test_the_literal_check_finds_a_family_name_where_it_would_hide():
    """The check above is live: the ways a family name slips into code are each caught."""
    snippet = ('if family == "sdxl":\n    pass\nTABLE = {"flux": 1}\nx = f(family="sd3")\n'
               'ModelPreset(name="sd15")\n')
    assert [value for _, value in family_literals(snippet)] == ["sdxl", "flux", "sd3", "sd15"]
    assert [value for _, value in family_literals(snippet, allowed="tdm_core/presets.py")] == ["sdxl", "flux", "sd3"]


def test_every_family_entry_is_complete_and_consistent():
    for family in families.FAMILIES.values():
        preset = presets.get_preset(family.default_preset)
        assert preset.family == family.name and preset.parametrisation == family.parametrisation, family.name
        assert family.training_recipe in recipes.RECIPES
        if family.distillable:
            assert family.lora_targets and family.repeated_blocks, family.name
        assert all(other in families.FAMILIES for other in family.also_fits)
    # every preset belongs to a family of the registry
    assert {p.family for p in presets.PRESETS.values()} <= set(families.FAMILIES)


@pytest.mark.parametrize(("lora", "model", "fits"), [
    ("sd3", "sd35", True), ("sd35", "sd3", False), ("sd15", "sdxl", False), (families.ANY_UNET, "sdxl", True),
    ("sd15", families.ANY_UNET, True), ("flux", "sd3", False), (families.UNKNOWN, "flux", True),
    ("cogvideox", families.OTHER_COGVIDEOX, False),
    ("wan21", "wan21", True), ("wan21", families.OTHER_WAN, False), ("wan21", "cogvideox", False),
    ("sd3", "wan21", False),
])
def test_which_loras_fit_which_models(lora, model, fits):
    assert families.lora_fits(lora, model) is fits


def test_presets_of_a_family_with_its_own_grid_fit_only_that_family():
    assert families.presets_fit("sd3", "sd35") and families.presets_fit("sd15", families.ANY_UNET)
    assert not families.presets_fit("sd3", "flux") and not families.presets_fit("flux", "sd3")
    assert not families.presets_fit("cogvideox", families.ANY_UNET)
    # Wan 2.1's shift-8 grid is its own: SD3's presets do not sample it, nor its preset SD3
    assert not families.presets_fit("sd3", "wan21") and not families.presets_fit("wan21", "sd3")
    assert families.presets_fit("wan21", "wan21")


@pytest.mark.parametrize(("comfy", "diffusers", "family"), [
    # Wan 2.1 in its two layouts (ComfyUI-native / Wan-AI, and diffusers' WanTransformer3DModel)
    (("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.3.ffn.2"), (), "wan21"),
    ((), ("blocks.0.attn1.to_q", "blocks.0.attn2.to_out.0", "blocks.7.ffn.net.0.proj"), "wan21"),
    # look-alikes that are not Wan: native CogVideoX (linears directly under the block), diffusers CogVideoX
    (("blocks.0.q", "blocks.0.ff_proj"), (), "cogvideox"),
    ((), ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.0.proj"), "cogvideox"),
])
def test_wan_lora_layouts_are_told_from_the_other_block_layouts(comfy, diffusers, family):
    assert families.detect_lora(families.LoraKeyLayout(comfy=comfy, diffusers=diffusers)) == family


def test_every_family_has_its_comfyui_adapter(pack):
    adapters = pack.nodes.family_adapters
    assert set(adapters.ADAPTERS) == set(families.FAMILIES)
    assert all(adapters.adapter(name).family is families.FAMILIES[name] for name in families.FAMILIES)
