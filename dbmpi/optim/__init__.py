"""Pure update rules (no MPI): what a parameter-server shard applies to its block."""

from .rules import SGD, Adagrad, make_optimizer

__all__ = ["SGD", "Adagrad", "make_optimizer"]
