"""Launching and the run folder: the verbs on a checked spec, the run folder and its checkpoints, processes and machines, sweeps."""
