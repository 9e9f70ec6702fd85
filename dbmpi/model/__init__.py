"""Layers and models. Parameters and gradients live in one flat float32 vector each, so that
the parameter server can fetch into and push from them without copies."""

from .autoencoder import Autoencoder  # registers loss = "autoencoder" with Model.from_spec
from .base import Layer, LayerKind, LayerSpec
from .layers import Dense
from .model import Model
from .ranking import RankingLM  # registers loss = "ranking"
from .registry import LAYER_KINDS, register

__all__ = ["LAYER_KINDS", "Autoencoder", "Dense", "Layer", "LayerKind", "LayerSpec", "Model",
           "RankingLM", "register"]
