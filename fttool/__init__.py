"""fttool: declarative fine-tuning of language models. See README.md."""

__version__ = "0.1.0"
