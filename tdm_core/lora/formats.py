"""The module name `load_lora` had before tdm_core.lora was split by concern (model, metadata, keys, parse,
convert); kept only because tests/test_distill_trainer.py and tests/test_distill_twins.py still import it from here.
New code imports from `tdm_core.lora`."""

from __future__ import annotations

from .parse import load_lora

__all__ = ["load_lora"]
