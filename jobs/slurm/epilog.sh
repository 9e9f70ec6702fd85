#!/bin/bash
# Epilog of the test cluster (runs as root on the node when a job ends): remove the shared
# memory that MPICH ranks started by srun leave in /dev/shm when a step is aborted or killed.
# MPICH names it mpich_{shm,vci}_HASH_NODE, HASH = 32-bit FNV-1a of PMI_JOBID ("JOB.STEP");
# a later job with the same id would attach to the stale segment and fail or hang in MPI_Init.
fnv1a() {
    local s=$1 h=2166136261 i c
    for ((i = 0; i < ${#s}; i++)); do
        printf -v c '%d' "'${s:i:1}"
        h=$(( ((h ^ c) * 16777619) & 0xFFFFFFFF ))
    done
    printf '%x' "$h"
}
for step in $(seq 0 31); do
    h=$(fnv1a "$SLURM_JOB_ID.$step")
    rm -f /dev/shm/mpich_shm_"$h"_* /dev/shm/mpich_vci_"$h"_*
done
exit 0
