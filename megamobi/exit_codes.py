"""Exit statuses of megamobi.pretrain, megamobi.launcher and launch/pretrain.sh (docs/launch.md).

    0    the run finished its steps
    1    a failure (a bug, a crashed rank): read the log above the last line
    2    a user error caught before any work (config, data, launch environment, rendezvous)
    3    training stopped on bad steps: train.max_bad_steps in a row, train.divergence (stop, max_rewinds),
         or weights in question (a non-finite step) when a save could not wait; the message names
         the newest healthy checkpoint to resume from (docs/training.md "Healthy checkpoints")
    74   a checkpoint could not be saved (disk full, permission denied, a read-only file system): the
         line above names the path and the free space; its partial directory was removed and `latest`
         still names the previous checkpoint. Make room (or fix the mount) and run the same command
    75   stopped early by a signal (SLURM's time-limit warning SIGUSR1, SIGTERM, SIGINT) after a clean
         checkpoint save: run the same command again (or let `scontrol requeue` do it) to continue
    76   hung: no progress for launch.hang_timeout_s (the job requeued itself under SLURM with
         launch.requeue), or a SIGTERM that could not be honoured within launch.stop_grace_s; stacks
         and the culprits in RUN_DIR/logs/hang-*/ (docs/reliability.md). Nothing is saved: resume
         from the newest checkpoint with the same command
    128+N  killed by signal N before it could save (e.g. 137 = SIGKILL): the previous checkpoint
         is intact; an interrupted save is left as checkpoints/.step_*.partial and ignored
"""

OK = 0
FAILED = 1
USAGE = 2
NON_FINITE = 3
SAVE_FAILED = 74  # sysexits' EX_IOERR
STOPPED_AFTER_SAVE = 75  # sysexits' EX_TEMPFAIL: "try again later", which is what a requeue does
HUNG = 76  # the hang watchdog stopped the job (megamobi/training/watchdog.py)
