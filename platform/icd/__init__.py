"""icd-platform: invertible consistency distillation of diffusion models on Ray."""

__version__ = "0.1.0"
