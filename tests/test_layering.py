"""The product's layering, read from its source: no import cycle, nothing importing up the layers (tdm_core below the
nodes' support modules below the node modules), no node module importing another, no lazy import standing in for a
layering problem (tdm_devkit/import_map.py)."""

from __future__ import annotations

from pathlib import Path

from tdm_devkit import import_map

REPO = Path(__file__).resolve().parents[1]


def test_the_product_has_no_cycle_and_no_import_up_the_layers():
    found = import_map.figures(REPO)
    assert found["cycles"] == []
    assert found["imports_up_the_layers"] == []
    assert found["node_module_to_node_module"] == []
    assert found["lazy_imports_in_nodes"] == 0


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The check is live: a tree with a cycle and a support module importing a node module fails it."""
    for package, files in {"tdm_core": {"a.py": "from . import b\n", "b.py": "from . import a\n"},
                           "nodes": {"support.py": "from . import node\n",
                                     "node.py": "from comfy_api.v0_0_2 import io\nclass N(io.ComfyNode):\n    pass\n",
                                     "other.py": "from . import node\nclass M(io.ComfyNode):\n    pass\n"}}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    found = import_map.figures(tmp_path)
    assert found["cycles"] == [["tdm_core.a", "tdm_core.b"]]
    assert found["imports_up_the_layers"] == [["nodes.support", "nodes.node"]]
    assert found["node_module_to_node_module"] == [["nodes.other", "nodes.node"]]
