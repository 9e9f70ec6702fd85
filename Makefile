# dbmpi: two commands from a fresh clone.
#   make demo   set up, make the demo data, train with Downpour under mpiexec (5 ranks)
#   make test   set up, then the whole suite: serial tests, MPI tests at 2 and 4 ranks, and
#               the MPI tests with 4 ranks on 3 network-namespace hosts over TCP (root only)
#   make check  the unit tests only (no MPI job starts: tests marked `job` are left out)
#   make lint   ruff (the version pinned in pyproject's `test` extra)
# Uses the active virtualenv if there is one, else creates .venv. The PyPI `mpich` wheel is
# installed unless the machine already has an mpiexec (on a cluster: bring the site's MPI).

PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dbmpi-deps
comma := ,
MPI_EXTRA ?= $(if $(shell PATH="$(subst $(VENV)/bin:,,$(PATH))" command -v mpiexec 2>/dev/null),,mpich)
EXTRAS := test$(if $(MPI_EXTRA),$(comma)$(MPI_EXTRA))
MPIEXEC = $(firstword $(wildcard $(VENV)/bin/mpiexec) mpiexec)
KERNELS := $(wildcard cython_kernels/*.pyx cython_kernels/*.pxd cython_kernels/*.h)

# Ranks outnumber the cores in tests: MPICH ranks waiting in MPI must yield. The variables'
# one source is dbmpi.launch.MPICH_YIELD (`python -m dbmpi launch` sets them itself); read
# when a recipe runs, after setup. The demo goes through `dbmpi launch`.
YIELD_ENV = $(shell $(PY) -m dbmpi.launch --print-env)
export PYTHONUNBUFFERED := 1
PYTEST = OPENBLAS_NUM_THREADS=1 $(YIELD_ENV) $(PY) -m pytest

.PHONY: setup build demo test test-serial test-mpi test-multihost check lint bench clean slurm-up slurm-down

setup: $(STAMP)

# The editable install brings the dependencies and links the source tree; it compiles no
# kernel (DBMPI_NO_KERNELS=1): `build` compiles them once, in place, and again only when a
# kernel source changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=68" wheel "cython>=3.0" "numpy>=1.26" "scipy>=1.11"
	DBMPI_NO_KERNELS=1 $(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

build: $(STAMP) .kernels-built

.kernels-built: $(KERNELS) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

DEMO := data/demo
$(DEMO)/shards/manifest.json:
	$(PY) -m data_tools synth --out $(DEMO)/idx
	$(PY) -m data_tools shard idx --src $(DEMO)/idx --out $(DEMO)/shards --shards 4

demo: build $(DEMO)/shards/manifest.json
	$(PY) -m dbmpi launch jobs/configs/demo.toml

# All stages run even when one fails; the summary names each, and the exit status is
# non-zero when any failed.
test: build
	@serial=0; mpi=0; multi=0; \
	$(MAKE) --no-print-directory test-serial || serial=$$?; \
	$(MAKE) --no-print-directory test-mpi || mpi=$$?; \
	$(MAKE) --no-print-directory test-multihost || multi=$$?; \
	echo "make test: serial stage $$([ $$serial = 0 ] && echo passed || echo FAILED)," \
	     "MPI stage $$([ $$mpi = 0 ] && echo passed || echo FAILED)," \
	     "multi-host stage $$([ $$multi = 0 ] && echo passed || echo FAILED)"; \
	[ $$serial = 0 ] && [ $$mpi = 0 ] && [ $$multi = 0 ]

test-serial: build
	$(PYTEST) --durations=15 tests

test-mpi: build
	OPENBLAS_NUM_THREADS=1 $(YIELD_ENV) timeout 600 $(MPIEXEC) -n 2 $(PY) -m mpi4py -m pytest -x -p no:cacheprovider tests/mpi
	OPENBLAS_NUM_THREADS=1 $(YIELD_ENV) timeout 600 $(MPIEXEC) -n 4 $(PY) -m mpi4py -m pytest -x -p no:cacheprovider tests/mpi

# The MPI suite with its ranks on 3 namespace "hosts" that talk TCP (tests/netbed.py). Needs
# root; elsewhere it says why and succeeds, unless DBMPI_REQUIRE_NETNS=1.
# MULTIHOST_TESTS="tests/mpi/test_rma.py -vv" runs part of it.
MULTIHOST_TESTS ?= tests/mpi
test-multihost: build
	@if why=$$($(PY) -m tests.netbed check); then \
	  OPENBLAS_NUM_THREADS=1 timeout 900 $(PY) -m tests.netbed suite --hosts 3 -n 4 --timeout 600 \
	    -- $(MULTIHOST_TESTS); \
	elif [ "$${DBMPI_REQUIRE_NETNS:-}" = 1 ]; then \
	  echo "test-multihost: DBMPI_REQUIRE_NETNS=1 but $$why" >&2; exit 1; \
	else echo "test-multihost: not run: $$why"; fi

# Unit tests only: no MPI job, no SLURM (about two minutes).
check: build
	$(PYTEST) -m "not job" tests

RUFF_VERSION = $(shell sed -n 's/.*"ruff==\([^"]*\)".*/\1/p' pyproject.toml)
lint: setup
	$(PY) -m ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || \
	    $(PY) -m pip install -q "ruff==$(RUFF_VERSION)"
	$(PY) -m ruff check dbmpi data_tools tests benchmarks setup.py

SLURM_DIR ?= /tmp/dbmpi-slurm
# SLURM_NETNS=3: three nodes on namespace hosts (docs/multihost.md); clients via cluster.sh exec
slurm-up:   # one-node SLURM cluster on this machine (root); then: export SLURM_CONF=$(SLURM_DIR)/slurm.conf
	test -x /usr/sbin/slurmd || jobs/slurm/cluster.sh install
	jobs/slurm/cluster.sh up $(SLURM_DIR) $(if $(SLURM_NETNS),--netns $(SLURM_NETNS))

slurm-down:
	jobs/slurm/cluster.sh down $(SLURM_DIR)

clean:
	rm -rf build .kernels-built cython_kernels/*.so cython_kernels/*.c
