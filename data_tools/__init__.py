"""Offline data preparation: raw data -> dbmpi HDF5 shards + manifest.json.

Run ``python -m data_tools --help``. The shard format is defined once, in
``dbmpi.data.schema``.
"""
