"""Where the pack's nodes appear in ComfyUI's node library.

Every node a user picks by name lives under one "TDM" folder, so browsing the library finds them together. The two
nodes that fill a core socket of SamplerCustom / SamplerCustomAdvanced (TDM Sampler → SAMPLER, TDM Scheduler →
SIGMAS) stay in core's own folders instead, next to KSamplerSelect and BasicScheduler, where a SamplerCustom user
looks for a sampler or a scheduler; every display name starts with "TDM", so searching "TDM" lists all of them.
"""

from __future__ import annotations

LOADERS = "TDM/loaders"
SAMPLING = "TDM/sampling"
TRAINING = "TDM/training"
# core-slot nodes (see the module docstring)
CUSTOM_SAMPLERS = "sampling/custom_sampling/samplers"
CUSTOM_SCHEDULERS = "sampling/custom_sampling/schedulers"


def advanced(widget_input):
    """Marks an input as rarely used and returns it: the Nodes 2.0 mode of newer frontends (1.4x) folds it under
    "Show advanced inputs"; on the standard canvas, where the frontends show it with the rest, web/tdm_advanced.js
    folds it under the node's "show N advanced inputs" row. Newer ComfyUI has an `advanced` argument; on 0.3.75 the
    flag travels in the input's `extra_dict`, which every version merges into the schema it sends."""
    if hasattr(widget_input, "advanced"):
        widget_input.advanced = True
    else:
        widget_input.extra_dict = {**(getattr(widget_input, "extra_dict", None) or {}), "advanced": True}
    return widget_input
