"""Layers and models. Parameters and gradients live in one flat float32 vector each, so that
the parameter server can fetch into and push from them without copies."""

from .layers import Dense
from .model import Model

__all__ = ["Dense", "Model"]
