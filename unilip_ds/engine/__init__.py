"""Everything distributed lives here: process groups, DeepSpeed configs and engines,
checkpoints, EMA. Model and task code stay single-device code."""
