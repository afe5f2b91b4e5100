"""mi_tune: measure and improve how much of its input a language model's representation keeps."""

__version__ = "0.1.0"
