"""The development kit: tiny twins with real key layouts, the real-ComfyUI bootstrap, the live-server harness and the
workflow builder/checker, shared by tests/, bench/ and scripts/. The product (the pack's nodes and tdm_core) never
imports it, and the registry archive leaves it out (.comfyignore)."""
