"""Prints the README's per-model table from tdm_core.presets (a test checks the README carries it verbatim)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdm_core.presets import PRESETS  # noqa: E402

HEADER = (
    "| model | TDM LoRA → where it goes | base model → where it goes | strength | preset | steps | shift | "
    "NFE: base recipe → TDM |\n|---|---|---|---|---|---|---|---|"
)


def table() -> str:
    rows = [HEADER]
    for p in PRESETS.values():
        shift = f"{p.shift:g}" if p.shift else "—"
        teacher = p.teacher
        speedup = f"{teacher.nfe} ({teacher.steps} steps, CFG {teacher.cfg:g}) → {p.nfe} ({teacher.nfe / p.nfe:g}×)"
        rows.append(
            f"| {p.display_name} | [`{p.lora_file}`]({p.lora_source}) → `models/loras/` | "
            f"[`{p.base_model_file}`]({p.base_model_source}) → `models/{p.base_model_folder}/` | "
            f"{p.lora_strength:g} | `{p.name}` | {p.steps} | {shift} | {speedup} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
