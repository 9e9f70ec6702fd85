"""The Downpour replica with sparse embedding traffic (``downpour.sparse = true``).

The loop is :meth:`dbmpi.train.downpour.worker.Worker.run`; only the transport hooks differ (see
:mod:`dbmpi.ps.sparse`):

* a fetch reads the dense rest of the model and only the embedding rows the step reads (the
  minibatch's words; with the ranking objective also its target and corrupt words: the
  model's ``rows_read``; the loop reads the minibatch before it fetches);
* the embedding layer keeps its gradient as (rows, row gradients); every ``n_push`` steps the
  touched rows (duplicates summed) and the dense rest's gradient are pushed;
* ``train`` records also carry ``rows`` (unique rows per push); their ``fetch_bytes`` and
  ``push_bytes`` count parameter and gradient bytes per step, row ids included in pushes.
"""

from __future__ import annotations

import numpy as np

from ...ps.sparse import SparseClient, embedding_of
from .worker import Worker


class SparseWorker(Worker):
    counts_rows = True

    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics, resume=None):
        super().__init__(cfg, topo, model, dataset, ps, coord, metrics, resume)
        self.client = SparseClient(ps, *model.param_range, worker=self.worker,
                                   replica=topo.index)
        self.emb = embedding_of(model)
        self.emb.sparse = True

    def _fetch(self, x: np.ndarray, y: np.ndarray) -> int:
        rows = self.model.rows_read(x, y)
        return self.client.fetch_rows(self.model.params, rows,
                                      read_own_pushes=self.dp.read_own_pushes)

    def _push(self, accum: np.ndarray) -> tuple[int, int]:
        rows, grad_rows = self.emb.take_rows()
        return self.client.push_rows(accum, rows, grad_rows), rows.shape[0]
