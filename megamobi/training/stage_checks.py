"""Data stages: the config's checks, and what a resume may change (megamobi/data/stages.py defines them).

Config (RunConfig.validate): either data.paths (one data config) or data.stages; every stage has paths,
a val_fraction in [0, 1), and all but the last an until_tokens that grows from stage to stage, gives its
stage at least one step and ends before the run does; the last stage runs to the end (no until_tokens).

Resume (`stage_changes`): a stage that has not started yet may be changed, removed or appended, and the
running stage's end (until_tokens) may move as long as it stays ahead of the checkpoint: that is how a
run decides its annealing late. Those changes are accepted and recorded. Changing what a started stage
trains on (paths, their manifests, the content fingerprints of their shards, source_weights,
val_fraction), the end of a finished stage, the data
seed or seq_len would make the recorded order false: refused with old and new values unless
data.allow_change (then recorded, as before stages existed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamobi.config_io import ConfigError
from megamobi.data.fingerprints import SCHEME, directory_fingerprints, fingerprint_differences
from megamobi.data.stages import DataStage, first_step_at_tokens, stages_of
from megamobi.files import sha256_file

if TYPE_CHECKING:
    from megamobi.training.run_config import RunConfig


def validate_stages(run: RunConfig, *, check_data: bool) -> None:
    d = run.data
    if d.stages is not None:
        for key, value, unset in (("paths", d.paths, []), ("source_weights", d.source_weights, None),
                                  ("val_fraction", d.val_fraction, 0.0)):
            if value != unset:
                raise ConfigError(f"data.{key} and data.stages are both set: with stages, give {key} per stage "
                                  f"(data.stages[i].{key})")
        if not d.stages:
            raise ConfigError("data.stages is empty: list at least one stage (paths, and until_tokens for all but the "
                              "last), or use data.paths")
    stages = run.data_stages
    tps, total = run.tokens_per_step, run.total_steps
    names = [s.name for s in stages if s.name is not None]
    if len(set(names)) < len(names):
        raise ConfigError(f"data.stages: the stage names {names} repeat; give each stage its own name (or none)")
    previous: DataStage | None = None
    for stage in stages:
        _check_stage_data(stage, check_data=check_data)
        last = stage.index == len(stages) - 1
        until = d.stages[stage.index].until_tokens if d.stages else None
        if last:
            if until is not None:
                raise ConfigError(f"{stage.key}.until_tokens {until}: the last stage runs to the end of the run "
                                  "(train.steps / train.tokens); remove it, or append the stage that follows")
            continue
        if until is None:
            raise ConfigError(f"{stage.key}.until_tokens is missing: every stage but the last ends at a token count")
        if until <= 0:
            raise ConfigError(f"{stage.key}.until_tokens {until} must be positive")
        end_step = first_step_at_tokens(until, tokens_per_step=tps)
        if end_step >= total:
            raise ConfigError(f"{stage.key}.until_tokens {until:,} is at or past the run's end ({total * tps:,} tokens, "
                              f"{total:,} steps): the next stage would never start")
        if previous is not None:
            if until <= previous.until_tokens:
                raise ConfigError(f"{stage.key}.until_tokens {until:,} must be larger than {previous.key}.until_tokens "
                                  f"{previous.until_tokens:,}: stages run in order")
            if end_step == first_step_at_tokens(previous.until_tokens, tokens_per_step=tps):
                raise ConfigError(f"{stage.key}.until_tokens {until:,} ends in the same global batch as "
                                  f"{previous.key}.until_tokens {previous.until_tokens:,} (both at step {end_step:,} of "
                                  f"{tps:,} tokens): {stage.label()} would get no step")
        previous = stage


def _check_stage_data(stage: DataStage, *, check_data: bool) -> None:
    if not 0 <= stage.val_fraction < 1:
        raise ConfigError(f"{stage.key}.val_fraction {stage.val_fraction} must be within [0, 1)")
    if not stage.paths:
        raise ConfigError(f"{stage.key}.paths is empty: give the directories written by data_tools/preprocess_amber.py")
    for path in stage.paths if check_data else ():
        if not Path(path).exists():
            where = "" if Path(path).is_absolute() else f" (relative paths are read from the current directory, {Path.cwd()})"
            raise ConfigError(f"{stage.key}.paths: {path} does not exist{where}")
        if Path(path).is_file():
            raise ConfigError(f"{stage.key}.paths: {path} is a file; give the shard directory (the one holding manifest.json)")
        if not (Path(path) / "manifest.json").is_file():
            raise ConfigError(f"{stage.key}.paths: {path} has no manifest.json; build it with data_tools/preprocess_amber.py")


def manifest_checksums(paths: list[str]) -> dict[str, str]:
    """sha256 of each data directory's manifest.json (what checkpoints record as data_manifests)."""
    return {path: sha256_file(Path(path) / "manifest.json") for path in paths}


def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12]


def recorded_fingerprints(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's shard fingerprints by directory, None when it has none this code can compare
    (written before they were recorded, or with another sampling scheme)."""
    found = manifest.get("data_fingerprints") or {}
    return found.get("paths") if found.get("scheme") == SCHEME else None


def content_check_note(manifest: dict[str, Any], *, checkpoint: Path) -> str | None:
    """One line when a resume cannot compare the shards' content, only their manifest.json."""
    if not (manifest.get("run_config") or {}).get("data") or manifest.get("data_manifests") is None:
        return None  # a weights-only checkpoint: no data to compare with
    if recorded_fingerprints(manifest) is not None:
        return None
    return (f"{checkpoint} records no shard fingerprints (written by an older megamobi): the shards' content cannot "
            "be checked on this resume, only their manifest.json; --verify-shards hashes every shard against it")


def _data_differences(old: DataStage, new: DataStage, *, recorded: dict[str, str], current: dict[str, str],
                      prints: dict[str, Any] | None) -> list[str]:
    """What this stage trains on, old -> new: paths (or their manifests, or their shards' content), blend,
    split."""
    key = new.key
    out = []
    if [recorded.get(p) for p in old.paths] != [current[p] for p in new.paths]:
        if old.paths != new.paths:
            out.append(f"{key}.paths: {old.paths} -> {new.paths}")
        else:
            out += [f"{p}/manifest.json: sha256 {_short(recorded.get(p))} -> {_short(current[p])} (the shards were rebuilt "
                    "or replaced)" for p in old.paths if recorded.get(p) != current[p]]
    elif prints is not None:  # same manifests: are the shards still the bytes they describe?
        for p in old.paths:
            if p in prints:
                out += fingerprint_differences(p, recorded=prints[p], current=directory_fingerprints(p))
    for field in ("source_weights", "val_fraction"):
        if getattr(old, field) != getattr(new, field):
            out.append(f"{key}.{field}: {getattr(old, field)} -> {getattr(new, field)}")
    return out


def stage_changes(manifest: dict[str, Any], run: RunConfig) -> tuple[list[str], list[str]]:
    """(accepted, refused): how the run's data differs from the data `manifest`'s checkpoint trained on.
    Both empty when nothing changed."""
    saved = manifest.get("run_config") or {}
    saved_data, saved_batch = saved.get("data") or {}, saved.get("batch") or {}
    recorded = manifest.get("data_manifests")
    if not saved_data or recorded is None:
        return [], []  # a weights-only checkpoint (e.g. from `convert from-hf`): no data to compare with
    old, new = stages_of(saved_data), run.data_stages
    current = manifest_checksums(list(dict.fromkeys(p for s in new for p in s.paths)))
    running = (manifest.get("data_stage") or {}).get("index", 0)  # the stage of the checkpoint's last step
    consumed = manifest.get("consumed_tokens", 0)
    prints = recorded_fingerprints(manifest)
    accepted, refused = [], []
    for stage in old:
        now = new[stage.index] if stage.index < len(new) else None
        if stage.index > running:  # not started: anything goes
            if now is None:
                accepted.append(f"{stage.key} ({stage.label()}, not started) removed")
                continue
            differences = _data_differences(stage, now, recorded=recorded, current=current, prints=prints)
            if stage.until_tokens != now.until_tokens:
                differences.append(f"{now.key}.until_tokens: {stage.until_tokens} -> {now.until_tokens}")
            accepted += [f"{d} ({stage.label()}, not started)" for d in differences]
            continue
        if now is None:
            refused.append(f"{stage.key} ({stage.label()}) removed, but it has trained")
            continue
        refused += _data_differences(stage, now, recorded=recorded, current=current, prints=prints)
        if stage.name != now.name:
            accepted.append(f"{now.key}.name: {stage.name} -> {now.name}")
        if stage.until_tokens != now.until_tokens:
            change = f"{now.key}.until_tokens: {stage.until_tokens} -> {now.until_tokens}"
            finished = stage.index < running or (stage.until_tokens is not None and consumed >= stage.until_tokens)
            if finished:
                refused.append(f"{change} ({stage.label()} finished at {consumed:,} tokens or before)")
            elif now.until_tokens is not None and now.until_tokens <= consumed:
                refused.append(f"{change} (it would end {stage.label()} before the {consumed:,} tokens it has trained)")
            else:
                accepted.append(f"{change} ({stage.label()} is running; its new end is still ahead)")
    accepted += [f"{s.key} ({s.label()}) appended" for s in new[len(old):]]
    if saved_data.get("seed", 1234) != run.data.seed:
        refused.append(f"data.seed: {saved_data.get('seed', 1234)} -> {run.data.seed}")
    if saved_batch.get("seq_len") != run.batch.seq_len:
        refused.append(f"batch.seq_len: {saved_batch.get('seq_len')} -> {run.batch.seq_len}")
    return accepted, refused


def check_stage_position(run: RunConfig, manifest: dict[str, Any], *, checkpoint: Path) -> None:
    """A data stage's order continues in whole global batches from where the stage began: a resume under
    another global batch must divide the samples the running stage has consumed (as it must divide
    consumed_samples for a run without stages)."""
    from megamobi.data.stages import stage_index_at

    record = manifest.get("data_stage")
    if not record or stage_index_at(run.data_stages, manifest.get("consumed_tokens", 0)) != record["index"]:
        return  # no stage record, or the next step begins a stage (its order starts at 0)
    position, gb = (manifest.get("consumed_samples") or 0) - record["start_samples"], run.batch.global_batch_size
    if position % gb:
        raise ConfigError(
            f"batch.global_batch_size {gb} does not divide the {position} samples that stage {record['index'] + 1} has "
            f"consumed by {checkpoint}, the checkpoint this run resumes from, so its order cannot continue exactly: use "
            f"a global batch that divides {position}, or a new run_dir")
