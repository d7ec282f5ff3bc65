"""The planner: what a run will cost before it starts, from the spec and the model's config.json alone (no torch).

summary.py is what `fttool check` prints about a checked spec; budget.py is `fttool plan` (memory and time per
device, the fit verdict, predicted vs measured), built on shapes.py (layer sizes), estimate.py (memory by item, as
each method and strategy divides it; FLOPs per token), cards.py (the GPU table), fit.py (the verdict and the
cheapest fixes) and workload.py (tokens from a sample of the data, the CPU's matmul rate). Composing and validating
a config uses none of it."""
