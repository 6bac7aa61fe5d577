"""Diffusion math (pure functions over tensors) and the samplers built on it.

Guidance notation: ``eps_w = eps(c) + w * (eps(c) - eps(empty))``; ``w = 0`` is unguided,
code ``w = 7`` is classical CFG 8.
"""
