"""Checks of the checkpoints a run starts from, before any process starts (and again at start):
the model recorded in a checkpoint must be the run's model, and a resumed position must fit the batch.

Without these, `checkpoint.init_from` a per-layer-FFN checkpoint into a shared-FFN model keeps one of
the FFNs and silently drops the rest, and a run_dir holding another model's checkpoints crashes on
every rank. Also `model: from_checkpoint`: the run's model is the one recorded in the checkpoint it
starts from (its newest own checkpoint, else checkpoint.init_from), so a `convert from-hf` import
needs no hand-written model YAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamobi.checkpointing.manifest import MANIFEST_NAME, complete_checkpoints
from megamobi.config_io import ConfigError, from_dict
from megamobi.model_config import ModelConfig
from megamobi.training.resume_choice import newest_usable, no_usable_checkpoint

FROM_CHECKPOINT = "from_checkpoint"
# The fields that decide which weights exist and their shapes; name, max_seq_len, rope_theta,
# rms_norm_eps, init_std and activation_checkpointing may change between runs of the same weights.
WEIGHT_FIELDS = ("ffn_sharing", "hidden_size", "num_layers", "num_attention_heads", "kv_heads",
                 "intermediate_size", "vocab_size")


def read_checkpoint_manifest(checkpoint: str | Path, *, what: str) -> dict[str, Any]:
    """The manifest of `checkpoint`, or a ConfigError saying what `checkpoint` is instead."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file; give a checkpoint directory (RUN_DIR/checkpoints/step_*)")
    if not (path / MANIFEST_NAME).is_file():
        latest = path / "checkpoints" / "latest"
        hint = (f"; it is a run directory: give one of its checkpoints, e.g. {path / 'checkpoints' / latest.read_text().strip()}"
                if latest.is_file() else "; it is not a megamobi checkpoint, or it was never completed")
        raise ConfigError(f"{what}: {path} has no {MANIFEST_NAME}{hint}")
    try:
        return json.loads((path / MANIFEST_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: {path / MANIFEST_NAME} is damaged ({err})") from None


def recorded_model(manifest: dict[str, Any], *, checkpoint: str | Path) -> ModelConfig:
    if "model_config" not in manifest:
        raise ConfigError(f"{checkpoint}/{MANIFEST_NAME} records no model_config")
    return from_dict(ModelConfig, manifest["model_config"], where=f"{checkpoint}/{MANIFEST_NAME}: model_config")


def model_differences(saved: ModelConfig, run: ModelConfig) -> list[str]:
    return [f"{field} {getattr(saved, field)} (checkpoint) vs {getattr(run, field)} (run)"
            for field in WEIGHT_FIELDS if getattr(saved, field) != getattr(run, field)]


def check_same_model(checkpoint: str | Path, manifest: dict[str, Any], run_model: ModelConfig, *, what: str) -> None:
    differences = model_differences(recorded_model(manifest, checkpoint=checkpoint), run_model)
    if differences:
        raise ConfigError(f"{what}: {checkpoint} holds a different model: {'; '.join(differences)}. Its weights "
                          f"would not fit (or be silently dropped): use the checkpoint's model (model: {FROM_CHECKPOINT}), "
                          "or a checkpoint / run_dir of this model")


def newest_own_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in run_dir whose manifest reads and whose files are all there at their
    recorded sizes: damaged newer ones are skipped, as the Trainer skips them (checksums are checked
    at start, not here)."""
    return newest_usable(run_dir)[0]


def model_from_checkpoint(data: dict[str, Any], *, where: str) -> dict[str, Any]:
    """For `model: from_checkpoint` in raw run-config data: the model config the run starts from."""
    checkpoint = data.get("checkpoint") or {}
    own = newest_own_checkpoint(data["run_dir"]) if isinstance(data.get("run_dir"), str) and checkpoint.get("resume", True) else None
    if own is not None:
        source, what = own, f"{where}: model: {FROM_CHECKPOINT} (run_dir's newest checkpoint)"
    elif checkpoint.get("init_from"):
        source, what = Path(str(checkpoint["init_from"])), f"{where}: model: {FROM_CHECKPOINT} (checkpoint.init_from)"
    elif isinstance(data.get("run_dir"), str) and checkpoint.get("resume", True) and (
            skipped := newest_usable(data["run_dir"])[1]):  # checkpoints, none usable: the refusal that lists them
        raise no_usable_checkpoint(data["run_dir"], skipped)
    else:
        raise ConfigError(f"{where}: model: {FROM_CHECKPOINT} needs checkpoint.init_from (e.g. a `convert from-hf` "
                          "output) or a run_dir that already holds checkpoints")
    config = recorded_model(read_checkpoint_manifest(source, what=what), checkpoint=source)
    return dict(config.__dict__)


def check_start_checkpoints(run, *, resume_from: Path | None) -> None:
    """Before any process starts (pretrain --check-only and every start): what the run will load, its
    own checkpoint `resume_from` (megamobi.training.resume_choice.resume_plan), else checkpoint.init_from.
    Raises ConfigError naming the key and what to do."""
    if complete_checkpoints(run.run_dir) and not run.checkpoint.resume:
        raise ConfigError(f"{run.run_dir} already holds checkpoints and checkpoint.resume is false: a new run "
                          "would overwrite them. Use a new run_dir, or checkpoint.resume: true to continue.")
    check_trainer_start(run, resume_from=resume_from)


def check_trainer_start(run, *, resume_from: Path | None) -> None:
    """The same checks in the Trainer, for the checkpoint it chose to resume from (or init_from)."""
    if resume_from is not None:
        check_resume_checkpoint(run, resume_from)
    elif run.checkpoint.init_from:
        check_init_from(run)


def check_resume_checkpoint(run, checkpoint: Path) -> None:
    manifest = read_checkpoint_manifest(checkpoint, what="run_dir")
    check_same_model(checkpoint, manifest, run.model_config, what=f"run_dir {run.run_dir}")
    consumed = manifest.get("consumed_samples") or 0
    gb = run.batch.global_batch_size
    if consumed % gb:
        raise ConfigError(
            f"batch.global_batch_size {gb} does not divide the {consumed} samples consumed by {checkpoint}, the "
            "checkpoint this run resumes from, so the data order cannot continue exactly: use a global batch "
            f"that divides {consumed}, or a new run_dir")
    from megamobi.training.stage_checks import check_stage_position

    check_stage_position(run, manifest, checkpoint=checkpoint)  # the same, for the position in a running data stage


def check_init_from(run) -> None:
    path = Path(run.checkpoint.init_from)
    manifest = read_checkpoint_manifest(path, what="checkpoint.init_from")
    check_same_model(path, manifest, run.model_config, what="checkpoint.init_from")
    if not (path / "model").is_dir():
        raise ConfigError(f"checkpoint.init_from: {path} has no model/ weights directory; is it a megamobi checkpoint?")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # in the Trainer: its files, hashed once, shared over the ranks
        from megamobi.checkpointing.verified import refusal
        from megamobi.training.checkpoint import verify_checkpoint_across_ranks

        broken = refusal(path, verify_checkpoint_across_ranks(path), use="initialize the model from")
        if broken:
            raise ConfigError(f"checkpoint.init_from: {broken}")


def check_validation_data(run, data) -> None:
    """Validation asked for, but the split came out empty (too little data for data.val_fraction)."""
    for part in data.stages if run.train.eval_interval > 0 else ():
        if part.val is None:
            key = f"{part.stage.key}.val_fraction"
            raise ConfigError(f"train.eval_interval {run.train.eval_interval} asks for validation, but {key} "
                              f"{part.stage.val_fraction} of {part.stage.paths} gives no validation samples: raise "
                              f"{key}, or set train.eval_interval: 0")
