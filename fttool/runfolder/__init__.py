"""The run folder's contracts, shared by every stage: its file names and whole-or-nothing writes (runfiles.py), the
read side of a run folder (folder.py: its spec, weights, lineage) and its checkpoints (checkpoint.py: manifests,
trust, rotation, the best one). Launching writes a run folder (launch/rundir.py); the worker and the verbs that run
after training read it through this package."""
