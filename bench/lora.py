"""Measures TDM LoRA loader parity per format: max |ComfyUI(TDM loader) − diffusers| and |ComfyUI − merged weights|,
relative to the output's largest magnitude, at strengths 0.125 and 1.0, plus load+patch time. Prints one JSON line.

    .venv/bin/python bench/lora.py
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdm_devkit import comfy_runtime  # noqa: E402

comfy_runtime.bootstrap()
comfy_runtime.load_pack()

from tdm_core import lora as tdm_lora  # noqa: E402
from tdm_devkit import lora_files, twins  # noqa: E402
from tdm_devkit import lora_parity as parity  # noqa: E402


def main() -> None:
    loader = sys.modules[f"{comfy_runtime.PACK_MODULE_NAME}.nodes.lora_loader"]
    made = {"sd15_twin": twins.sd15_twin(0), "sd3_twin": twins.sd3_twin(0), "sd35_twin": twins.sd3_twin(0, sd35=True)}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for case_id, twin_name, options, write, diffusers_loads in parity.CASES:
            twin = made[twin_name]
            family = "sd15" if twin.family == "sd15" else "sd3"
            synthetic = lora_files.synthesise(twin.diffusers, twin.family, targets=parity.case_targets(twin, options), alpha=options.get("alpha"), seed=7)
            path = write(synthetic, _mkdir(Path(folder) / case_id), twin)
            start = time.perf_counter()
            parsed = tdm_lora.load_lora(path)
            loader.apply_tdm_lora(twin.comfy, None, parsed, 1.0)
            load_s = time.perf_counter() - start
            reference_module = None
            if diffusers_loads:
                reference_module = copy.deepcopy(twin.diffusers)
                pipeline = parity.diffusers_pipeline(reference_module, family)
                pipeline.load_lora_weights(str(path), adapter_name="tdm")
            entry = {"modules": len(parsed.model_modules), "load_and_patch_s": round(load_s, 3)}
            for strength in parity.STRENGTHS:
                ours = parity.comfy_output(loader.apply_tdm_lora(twin.comfy, None, parsed, strength).model, family)
                merged = parity.merged_output(twin, synthetic, strength)
                scale = merged.abs().max().item()
                entry[f"vs_merged@{strength}"] = float(f"{(ours - merged).abs().max().item() / scale:.2e}")
                if reference_module is not None:
                    pipeline.set_adapters(["tdm"], [strength])
                    reference = parity.diffusers_output(reference_module, family)
                    entry[f"vs_diffusers@{strength}"] = float(f"{(ours - reference).abs().max().item() / scale:.2e}")
            results[case_id] = entry
    print(json.dumps(results))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    main()
