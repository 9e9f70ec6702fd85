# Site set-up, sourced by every job script (jobs/*.sbatch, jobs/local.sh). Edit this file for
# your machine; the job scripts stay the same everywhere.

# Modules: load the site's Python and MPI here (mpi4py must be built against that MPI).
# module load python/3.11 cray-mpich

# The project and its virtualenv (DBMPI_VENV to use another one).
DBMPI_ROOT=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DBMPI_ROOT
if [ -f "${DBMPI_VENV:-$DBMPI_ROOT/.venv}/bin/activate" ]; then
    source "${DBMPI_VENV:-$DBMPI_ROOT/.venv}/bin/activate"
fi
export PYTHONPATH=$DBMPI_ROOT${PYTHONPATH:+:$PYTHONPATH}  # data_tools from any directory

# Ranks may outnumber cores: MPICH ranks waiting in MPI then yield their core instead of
# busy-polling (docs/performance.md, "Oversubscription"; other MPIs ignore these variables).
# Their one list is dbmpi.launch.MPICH_YIELD; a value already in the environment wins.
if ! yield_env=$(python -m dbmpi.launch --print-env --shell); then
    echo "jobs/site.sh: python -m dbmpi.launch failed: load the site's Python with dbmpi's" \
         "dependencies (or set DBMPI_VENV) above" >&2
    return 1 2>/dev/null || exit 1
fi
eval "$yield_env"
# One BLAS thread per rank unless the job asked for more CPUs per task.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$OPENBLAS_NUM_THREADS}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OPENBLAS_NUM_THREADS}
export PYTHONUNBUFFERED=1

# How job scripts start ranks inside an allocation: srun (default) or mpiexec (the MPI's own
# launcher, e.g. when srun's PMI does not match your MPI).
DBMPI_LAUNCHER=${DBMPI_LAUNCHER:-srun}
