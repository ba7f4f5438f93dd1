"""wsss: weakly-supervised semantic segmentation with transformers (AFA, AReAM)."""

__version__ = "0.1.0"
