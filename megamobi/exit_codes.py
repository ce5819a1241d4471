"""Exit statuses of megamobi.pretrain, megamobi.launcher and launch/pretrain.sh (docs/launch.md).

    0    the run finished its steps
    1    a failure (a bug, a crashed rank): read the log above the last line
    2    a user error caught before any work (config, data, launch environment, rendezvous)
    3    training stopped on repeated non-finite losses (train.max_bad_steps)
    75   stopped early by a signal (SLURM's time-limit warning SIGUSR1, SIGTERM) after a clean
         checkpoint save: run the same command again (or let `scontrol requeue` do it) to continue
    128+N  killed by signal N before it could save (e.g. 137 = SIGKILL): the previous checkpoint
         is intact; an interrupted save is left as checkpoints/.step_*.partial and ignored
"""

OK = 0
FAILED = 1
USAGE = 2
NON_FINITE = 3
STOPPED_AFTER_SAVE = 75  # sysexits' EX_TEMPFAIL: "try again later", which is what a requeue does
