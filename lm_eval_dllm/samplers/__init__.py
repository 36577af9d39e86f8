"""Unmasking samplers, one per file, behind a registry: `make_sampler("threshold", {"tau": 0.9})`.

Register your own with `@register_sampler("name")` on a `Sampler` subclass (see README).
"""

from .base import (
    Action,
    Sampler,
    StepState,
    available_samplers,
    make_sampler,
    register_sampler,
    sampler_class,
    sampler_params,
    top_k,
)
from . import confidence, entropy, eb, factor, learned, margin, random, threshold  # noqa: F401  (registers)

__all__ = [
    "Action",
    "Sampler",
    "StepState",
    "available_samplers",
    "make_sampler",
    "register_sampler",
    "sampler_class",
    "sampler_params",
    "top_k",
]
