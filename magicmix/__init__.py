"""MagicMix semantic image mixing (Liew et al. 2022) as a ModelsLab-compatible service."""

__version__ = "0.1.0"
