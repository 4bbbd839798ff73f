"""TDM sampler nodes: SAMPLER, SIGMAS and the all-in-one sampler (tdm_core.schedules / tdm_core.solvers)."""

NODES: list = []
