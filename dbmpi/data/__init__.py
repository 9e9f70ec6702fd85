"""Sharded HDF5 data: the schema (``schema``) and the per-replica reader (``reader``).

>>> ds = open_dataset("data/fmnist")                  # checks manifest + every shard
>>> with ds.reader("train", replica=r, num_replicas=R, batch_size=128) as rd:
...     x, y = rd.next_batch()                        # float32 (128, 28, 28), int64 (128,)
>>> xt, yt = ds.load("test")                          # a whole small split, for evaluation
"""

from .reader import Dataset, ShardReader, open_dataset
from .schema import SCHEMA_VERSION, DataError

__all__ = ["SCHEMA_VERSION", "DataError", "Dataset", "ShardReader", "open_dataset"]
