"""Pure update rules (no MPI): what a parameter-server shard applies to its block."""

from .rules import OPTIMIZERS, SGD, Adagrad, Adam, Momentum, Optimizer, make_optimizer

__all__ = ["OPTIMIZERS", "SGD", "Adagrad", "Adam", "Momentum", "Optimizer", "make_optimizer"]
