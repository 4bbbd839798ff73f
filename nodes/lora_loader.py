"""The TDM LoRA Loader node (tdm_core.lora does the reading and conversion)."""

NODES: list = []
