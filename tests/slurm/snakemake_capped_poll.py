"""`python -m snakemake`, with the SLURM executor's status-poll back-off capped (tests only).

snakemake-executor-plugin-slurm 2.8 waits ``--slurm-init-seconds-before-status-checks``
before its first squeue/sacct query and then adds 10 s to the wait after every
query in which no job *completed* (failures do not reset it), up to 180 s. That
protects a real slurmctld; on the test cluster it turns seconds of work into
minutes of waiting (a three-attempt retry took 106 s, 80 of them asleep). This
launcher caps the wait at CAP_SECONDS and changes nothing else: submission,
sbatch flags, squeue parsing, failure handling and retries are the plugin's own.
Run exactly like ``python -m snakemake``; the cluster jobs themselves start
plain ``python -m snakemake`` (the plugin builds that command), unpatched.
"""

from __future__ import annotations

import os
import sys

import snakemake_executor_plugin_slurm
from snakemake.cli import main

CAP_SECONDS = float(os.environ.get("BISMAP_TEST_SLURM_MAX_POLL_SECONDS", "2"))
_check_active_jobs = snakemake_executor_plugin_slurm.Executor.check_active_jobs


async def check_active_jobs_capped(self, active_jobs):
    async for job in _check_active_jobs(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = min(self.next_seconds_between_status_checks, CAP_SECONDS)


snakemake_executor_plugin_slurm.Executor.check_active_jobs = check_active_jobs_capped

if __name__ == "__main__":
    sys.exit(main())
