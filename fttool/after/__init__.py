"""After training: evaluation against the base, export, the model card, generation and chat."""
