"""One YAML file describes a run. Loaded into typed dataclasses and checked before any process starts.

    python -m megamobi.pretrain --config configs/pretrain-tiny-cpu.yaml optimizer.lr=1e-3 train.steps=50

Everything that can be checked without a process group is checked in `validate()`; the checks that
need the world size (batch divisibility, layout) take it as an argument, so the launcher can run
them on the login node too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from megamobi.config_io import ConfigError, apply_overrides, from_dict, read_yaml
from megamobi.model_config import ModelConfig, load_model_config, resolve_model_config_path
from megamobi.training.divergence import DivergenceConfig
from megamobi.training.launch_config import LaunchConfig

SAMPLE_TOKENS = 2049  # every shard sample: 2048 inputs + 1 shifted label (Amber's windows)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One data stage (megamobi/data/stages.py): its own data config, trained until `until_tokens`."""

    paths: list[str]
    name: str | None = None
    source_weights: dict[str, float] | None = None
    val_fraction: float = 0.0
    # The stage ends at the first step whose consumed tokens reach this (whole global batches); the last
    # stage has none: it runs to the end of the run.
    until_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Either paths (+ source_weights, val_fraction): one data config for the whole run, or stages.
    paths: list[str] = dataclasses.field(default_factory=list)
    source_weights: dict[str, float] | None = None
    val_fraction: float = 0.0
    seed: int = 1234
    # Ordered data stages, each with its own paths / source_weights / val_fraction / until_tokens
    # (docs/data.md "Data stages"); a stage not yet started may be changed or appended on resume.
    stages: list[StageConfig] | None = None
    # Resume even though what a started stage trains on (manifests, blend, split), a finished stage's end,
    # the seed or seq_len differ from the checkpoint's; the change is logged and recorded
    # (megamobi/training/data_provenance.py). Off: such a resume stops.
    allow_change: bool = False


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int
    global_batch_size: int  # in sequences
    # Each 2049-token sample is cut into 2048 / seq_len windows of seq_len + 1 tokens (no waste,
    # because 2049 = k * seq_len + 1), so small models can train on short sequences.
    seq_len: int = 2048


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    weight_decay: float = 0.1  # never applied to norms
    clip_grad: float = 1.0
    # cosine: the paper's warmup + cosine to min_lr at the end. wsd: warmup, then lr held (stable), then
    # a decay of decay_shape to min_lr over the last decay_tokens (or from decay_start_tokens) of the run.
    decay_style: Literal["cosine", "wsd"] = "cosine"
    decay_shape: Literal["linear", "cosine", "1-sqrt"] | None = None  # wsd only; default linear
    decay_tokens: int | None = None  # wsd: the decay's length, ending where the run ends
    decay_start_tokens: int | None = None  # wsd: or where the decay starts (tokens consumed before it)
    # Resume although the lr schedule differs from the checkpoint's in a way that changes steps already
    # taken or the lr of the next one (megamobi/training/schedule_checks.py); recorded when used.
    allow_schedule_change: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Give exactly one of steps / tokens; the cosine schedule ends at the last step.
    steps: int | None = None
    tokens: int | None = None
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0  # 0: no validation
    eval_samples: int = 64
    max_bad_steps: int = 5  # consecutive skipped bad steps before the run stops (divergence.action: skip)
    # What a non-finite or spiking loss does: skip the update, stop, or rewind and re-run (docs/reliability.md).
    divergence: DivergenceConfig = dataclasses.field(default_factory=DivergenceConfig)
    straggler_ratio: float = 1.3  # a rank slower than this x the median of its peers is named every log_interval
    consistency_check_interval: int = 1000  # steps between replica checksum checks (and before every save); 0: off
    # Kernels (megamobi/kernels, docs/performance.md): auto = flash-attn / liger-kernel / chunked
    # cross entropy where each applies; plain = the model exactly as megamobi/model.py writes it.
    kernels: str = "auto"
    compile: bool = False  # torch.compile each decoder layer (T = 1, P = 1, ZeRO 0-2)
    compile_backend: str = "inductor"  # or aot_eager (no C compiler needed; what the CPU tests use)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 1
    partition_method: str = "parameters"  # pipeline stage balancing
    sequence_parallel: bool = False  # Megatron sequence parallelism over the tensor ranks (tensor >= 2)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    interval_tokens: int = 0  # 0: only at the end and on SLURM's warning signal
    keep_last: int | None = None  # None keeps every checkpoint (the paper released 300+)
    resume: bool = True  # continue from the latest complete checkpoint in run_dir
    # When run_dir holds checkpoints and none can be used, a start stops (exit 2) listing them; true:
    # move them (and metrics.jsonl, events.jsonl, tensorboard/) into run_dir/discarded-<time>/ and
    # train from step 0. Ignored while a checkpoint can be resumed (megamobi.training.resume_choice).
    restart_from_scratch: bool = False
    # false: no checkpoint when train.steps is reached (benchmarks: 0.5B writes ~7.5 GB for nothing);
    # interval and signal checkpoints are still written.
    save_final: bool = True
    # A checkpoint (e.g. from `python -m megamobi.convert from-hf`) whose weights start a NEW run;
    # ignored once run_dir has a checkpoint of its own.
    init_from: str | None = None
    # `checkpoint.async: true`: the step waits only for a copy of the state into CPU memory; the files
    # are written, hashed and verified in the background, and published only when every rank's are.
    async_save: bool = dataclasses.field(default=False, metadata={"key": "async"})


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "megamobi"
    wandb_mode: Literal["offline", "online"] = "offline"
    tensorboard: bool = False
    # Dense bf16 peak of one device in TFLOP/s, for MFU (A100: 312, H100/H200: 989). None: n/a.
    peak_tflops: float | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str
    model: str | ModelConfig  # a name in configs/, a path, an inline mapping, or from_checkpoint
    data: DataConfig
    batch: BatchConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    precision: Literal["bf16", "fp32"] = "bf16"
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)  # requeue on SLURM's warning, rendezvous timeout
    deepspeed: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra ds_config keys, passed through

    @property
    def model_config(self) -> ModelConfig:
        return self.model if isinstance(self.model, ModelConfig) else load_model_config(self.model)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.batch.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return -(-self.train.tokens // self.tokens_per_step)

    @property
    def data_stages(self):
        """list[megamobi.data.stages.DataStage]: data.stages, or data.paths as the one stage."""
        from megamobi.data.stages import stages_of

        return stages_of(dataclasses.asdict(self.data))

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def accumulation_steps(self, world_size: int) -> int:
        return self.batch.global_batch_size // (self.batch.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, *, world_size: int | None = None, check_data: bool = True) -> None:
        """Raise ConfigError for settings that cannot work; `world_size` adds the layout checks.
        check_data=False skips only the data.paths-on-disk check (the planner, megamobi.plan, runs
        where the data is not: a login node, a laptop)."""
        model = self.model_config
        b, o, t = self.batch, self.optimizer, self.train
        if b.micro_batch_size <= 0 or b.global_batch_size <= 0:
            raise ConfigError("batch.micro_batch_size and batch.global_batch_size must be positive")
        if b.seq_len > model.max_seq_len:
            raise ConfigError(f"batch.seq_len {b.seq_len} is longer than the model's max_seq_len {model.max_seq_len}")
        if b.seq_len <= 0 or (SAMPLE_TOKENS - 1) % b.seq_len:
            raise ConfigError(f"batch.seq_len {b.seq_len} must divide {SAMPLE_TOKENS - 1} (shard samples are {SAMPLE_TOKENS} tokens)")
        if (t.steps is None) == (t.tokens is None):
            raise ConfigError("give exactly one of train.steps and train.tokens")
        if self.total_steps <= 0:
            raise ConfigError("train.steps / train.tokens must be positive")
        if o.warmup_steps < 0 or o.warmup_steps > self.total_steps:
            raise ConfigError(f"optimizer.warmup_steps {o.warmup_steps} must be within 0..{self.total_steps} (the run's steps)")
        if not 0 <= o.min_lr <= o.lr:
            raise ConfigError(f"optimizer.min_lr {o.min_lr} must be within 0..lr ({o.lr})")
        from megamobi.training.schedule_checks import validate_schedule

        validate_schedule(self)  # decay_style wsd: decay_tokens / decay_start_tokens, decay_shape
        if o.clip_grad <= 0:
            raise ConfigError("optimizer.clip_grad must be positive (DeepSpeed would otherwise clip at 1.0 silently)")
        from megamobi.training.stage_checks import validate_stages

        validate_stages(self, check_data=check_data)  # data.paths or data.stages: each stage's data and boundary
        if self.parallel.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0..3, got {self.parallel.zero_stage}")
        if self.parallel.sequence_parallel:
            from megamobi.parallel.tensor_plan import validate_sequence_parallel

            validate_sequence_parallel(tensor=self.parallel.tensor, seq_len=b.seq_len)
        if self.parallel.zero_stage == 0 and self.precision == "bf16":
            raise ConfigError("parallel.zero_stage 0 with precision bf16: DeepSpeed 0.19's ZeRO-0 bf16 optimizer drifts "
                              "from fp32 AdamW and its state cannot be resharded; use zero_stage 1 (same memory per GPU "
                              "for the weights, the optimizer state sharded)")
        if t.log_interval <= 0 or t.max_bad_steps <= 0:
            raise ConfigError("train.log_interval and train.max_bad_steps must be positive")
        t.divergence.validate()
        if not 1 < t.straggler_ratio < float("inf"):
            raise ConfigError(f"train.straggler_ratio {t.straggler_ratio} must be a number above 1 (a rank this many "
                              "times slower than the median of its peers is named)")
        if t.consistency_check_interval < 0:
            raise ConfigError(f"train.consistency_check_interval {t.consistency_check_interval} must be 0 (off) or a "
                              "positive number of steps")
        self.launch.validate()
        from megamobi.kernels.plan import validate_kernel_options

        validate_kernel_options(kernels=t.kernels, compile=t.compile, compile_backend=t.compile_backend,
                                tensor=self.parallel.tensor, pipeline=self.parallel.pipeline,
                                zero_stage=self.parallel.zero_stage)
        if world_size is not None:
            from megamobi.parallel.tensor_plan import validate_layout

            validate_layout(model, tensor=self.parallel.tensor, pipeline=self.parallel.pipeline,
                            world_size=world_size, zero_stage=self.parallel.zero_stage)
            d = self.data_parallel_size(world_size)
            if b.global_batch_size % (b.micro_batch_size * d):
                raise ConfigError(
                    f"batch.global_batch_size {b.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
                    f"= {b.micro_batch_size} x {d}; pick a global batch that is a multiple of {b.micro_batch_size * d}"
                )
        from megamobi.training.config_checks import validate_run_details

        validate_run_details(self, world_size=world_size)  # keep_last, partition method, betas, deepspeed keys, ...


def load_run_config(path: str | Path, overrides: list[str] = (), *, check_data: bool = True) -> RunConfig:
    """Read RUN.yaml, apply `key.sub=value` overrides, resolve the model reference, validate."""
    path = Path(path)
    where = f"{path} (command-line overrides)"
    # `model.key=value` overrides apply to the model config a name (model: mobillama-0.5b) or
    # from_checkpoint stands for, so they wait until the reference is resolved below.
    model_overrides = [item for item in overrides if item.startswith("model.")]
    data = apply_overrides(read_yaml(path), [item for item in overrides if item not in model_overrides], where=where)
    if data.get("model") == "from_checkpoint":
        from megamobi.training.preflight import model_from_checkpoint

        data["model"] = model_from_checkpoint(data, where=str(path))  # the model the run starts from
    elif isinstance(data.get("model"), str):
        # A model reference is resolved relative to the repo's configs/ or as a path; fail here, not later.
        resolved = resolve_model_config_path(data["model"])
        if not resolved.is_file():
            raise ConfigError(f"{path}: model: {data['model']!r} is neither a config in configs/ nor a file")
        data["model"] = dataclasses.asdict(load_model_config(resolved))
    data = apply_overrides(data, model_overrides, where=where)
    config = from_dict(RunConfig, data, where=str(path))
    try:
        config.validate(check_data=check_data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config
