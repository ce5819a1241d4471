"""The pretraining driver: run config, LR schedule, DeepSpeed config, the loop, logging, checkpoints."""
