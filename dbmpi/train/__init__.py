"""Training algorithms built on :mod:`dbmpi.ps`, :mod:`dbmpi.model` and :mod:`dbmpi.optim`."""
