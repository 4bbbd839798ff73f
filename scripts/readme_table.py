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
        shift = f"{p.shift:g}" if p.shift else ("by size (μ 0.5–1.15)" if p.grid == "flux_shift" else "—")
        teacher = p.teacher
        guidance = f"guidance {p.extra['guidance']:g}" if "guidance" in p.extra else f"CFG {teacher.cfg:g}"
        speedup = f"{teacher.nfe} ({teacher.steps} steps, {guidance}) → {p.nfe} ({teacher.nfe / p.nfe:g}×)"
        # No released LoRA for some families: the student comes from TDM Distill, saved under this name.
        lora = (f"[`{p.lora_file}`]({p.lora_source})" if p.lora_source
                else f"none released: distil `{p.lora_file}` with TDM Distill")
        rows.append(
            f"| {p.display_name} | {lora} → `models/loras/` | "
            f"[`{p.base_model_file}`]({p.base_model_source}) → `models/{p.base_model_folder}/` | "
            f"{p.lora_strength:g} | `{p.name}` | {p.steps} | {shift} | {speedup} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
