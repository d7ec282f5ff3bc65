"""The worker: one training process, from spec.yaml to final/ (model, Trainer, callbacks, guard)."""
