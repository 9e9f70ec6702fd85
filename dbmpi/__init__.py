"""dbmpi: DistBelief on MPI (Dean et al., NIPS 2012).

Model replicas train asynchronously against a sharded parameter server built on MPI one-sided
windows (Downpour SGD). See README.md for the tour.
"""

__version__ = "0.1.0"
