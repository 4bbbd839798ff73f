"""Prints the product's import map figures as one JSON line (tdm_devkit/import_map.py): modules, imports, imports up
the layers, node modules importing node modules, lazy imports in nodes/, cycles, the largest module/class/function.

    .venv/bin/python scripts/import_map.py [repository root, default this one]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdm_devkit.import_map import figures  # noqa: E402

if __name__ == "__main__":
    print(json.dumps(figures(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)))
