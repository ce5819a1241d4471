"""Every command answers a user's mistake with exit status 2 and one message naming the argument, file
or key, never a traceback: a table of such mistakes, driven through the real command-line tools.

Starting a fresh interpreter that imports torch costs 3-4 s here, so each tool's cases run in ONE
fresh interpreter that calls the tool's `main(argv)` per case (exactly what `python -m ...` does,
stderr captured, any escaping exception recorded as a traceback), the tools in parallel threads.
One case per tool also goes through a genuine `python -m` / `python data_tools/...` subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = {"name": "t", "vocab_size": 512, "hidden_size": 32, "num_layers": 3, "num_attention_heads": 4,
         "intermediate_size": 48, "max_seq_len": 64}

# Runs the cases of one tool in one interpreter: [(entry "module:function", argv)] on stdin.
DRIVER = r"""
import contextlib, importlib, io, json, sys, traceback
results = []
for entry, argv in json.load(sys.stdin):
    module, function = entry.split(":")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = getattr(importlib.import_module(module), function)(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, token_shards):
    """Real inputs to make mistakes with: shards (ids < 512), a checkpoint of a 512-token model, a run
    directory, tokenizers with 600 and 400 pieces, a valid run config."""
    import torch

    from megamobi.checkpointing.manifest import write_manifest
    from megamobi.checkpointing.model_files import write_full_model
    from megamobi.config_io import from_dict
    from megamobi.data.tokenizer_training import train_tokenizer
    from megamobi.model import MobiLlama
    from megamobi.model_config import ModelConfig

    root = tmp_path_factory.mktemp("cli")
    config = from_dict(ModelConfig, MODEL, where="test")
    torch.manual_seed(0)
    run_dir = root / "run"
    checkpoint = run_dir / "checkpoints" / "step_0000002"
    checkpoint.mkdir(parents=True)
    write_full_model(checkpoint, MobiLlama(config).state_dict())
    write_manifest(checkpoint, model_config=config, info={"step": 2, "consumed_samples": 16, "consumed_tokens": 512})
    (run_dir / "checkpoints" / "latest").write_text("step_0000002\n")
    import argparse
    import collections
    import logging

    text = "\n".join(d for m in (argparse, collections, logging) for n in dir(m)
                     if isinstance(d := getattr(getattr(m, n), "__doc__", None), str)) * 3
    (root / "corpus.txt").write_text(text.encode("ascii", "ignore").decode())
    tok600 = train_tokenizer(inputs=[str(root / "corpus.txt")], output_prefix=str(root / "tok600"), vocab_size=600)
    tok400 = train_tokenizer(inputs=[str(root / "corpus.txt")], output_prefix=str(root / "tok400"), vocab_size=400)
    run_yaml = root / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "run_dir": str(root / "fresh-run"), "model": MODEL, "data": {"paths": [str(token_shards)]},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32},
        "optimizer": {"warmup_steps": 1}, "train": {"steps": 4}, "precision": "fp32"}))
    (root / "named.yaml").write_text(yaml.safe_dump({  # names its model: `model: tiny` (configs/tiny.yaml)
        "run_dir": str(root / "named-run"), "model": "tiny", "data": {"paths": [str(token_shards)]},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32}, "optimizer": {"warmup_steps": 1},
        "train": {"steps": 4}, "precision": "fp32"}))
    (root / "bad.yaml").write_text("name: [unclosed\n")
    (root / "typo.yaml").write_text(yaml.safe_dump({**MODEL, "hiden_size": 32}))
    (root / "negative.yaml").write_text(yaml.safe_dump({**MODEL, "num_layers": -1}))
    (root / "empty-stdlib").mkdir()
    (root / "a-dir").mkdir()
    return {"root": root, "shards": token_shards, "ckpt": checkpoint, "run_dir": run_dir, "tok600": tok600,
            "tok400": tok400, "run_yaml": run_yaml}


# (tool entry, argv with {placeholders}, text the message must contain). Entries: "module:function".
PRETRAIN = "megamobi.pretrain:main"
CASES = [
    # megamobi.model: config files and values
    ("megamobi.model:main", ["--config", "no-such-model"], "no-such-model.yaml: config file not found"),
    ("megamobi.model:main", ["--config", "{root}/bad.yaml"], "bad.yaml:2:1: not valid YAML"),
    ("megamobi.model:main", ["--config", "{root}/a-dir"], "is a directory"),
    ("megamobi.model:main", ["--config", "{root}/typo.yaml"], "unknown key(s) 'hiden_size'"),
    ("megamobi.model:main", ["--config", "{root}/negative.yaml"], "num_layers must be a positive integer"),
    ("megamobi.model:main", ["--config", "tiny", "--seq-len", "0"], "argument --seq-len: must be > 0"),
    # megamobi.pretrain --check-only: everything checkable before processes start
    (PRETRAIN, ["checkpoint.keep_last=-1"], "checkpoint.keep_last -1: must be at least 1"),
    (PRETRAIN, ["checkpoint.keep_last=0"], "checkpoint.keep_last 0: must be at least 1"),
    (PRETRAIN, ["checkpoint.keep_last=two"], "checkpoint.keep_last: expected an integer"),
    (PRETRAIN, ["checkpoint.async=1"], "checkpoint.async: expected true or false, got 1"),
    (PRETRAIN, ["checkpoint.async=yes please"], "checkpoint.async: expected true or false"),
    (PRETRAIN, ["checkpoint.async=null"], "checkpoint.async: expected true or false, got None"),
    (PRETRAIN, ["checkpoint.async_save=true"], "unknown key(s) 'async_save'"),
    (PRETRAIN, ["checkpoint.save_final=maybe"], "checkpoint.save_final: expected true or false, got 'maybe'"),
    (PRETRAIN, ["checkpoint.save_final=0"], "checkpoint.save_final: expected true or false, got 0"),
    (PRETRAIN, ["parallel.partition_method=balanced"], "parallel.partition_method 'balanced' is unknown"),
    (PRETRAIN, ["parallel.partition_method=type:Nothing"], "matches none of the pipeline pieces"),
    (PRETRAIN, ["optimizer.betas=[0.9]"], "optimizer.betas: expected a list of 2 values"),
    (PRETRAIN, ["optimizer.betas=[0.9, 1.5]"], "optimizer.betas [0.9, 1.5]: give two numbers in [0, 1)"),
    (PRETRAIN, ["deepspeed={train_batch_size: 99}"], "deepspeed.train_batch_size 99 contradicts the run config"),
    (PRETRAIN, ["deepspeed={gradient_accumulation_steps: 3}"], "deepspeed.gradient_accumulation_steps 3 contradicts"),
    (PRETRAIN, ["deepspeed={zero_optimization: {stage: 3}}"], "deepspeed.zero_optimization.stage 3 contradicts"),
    (PRETRAIN, ["deepspeed={bf16: {enabled: true}}"], "deepspeed.bf16.enabled True contradicts"),
    (PRETRAIN, ["deepspeed={optimizer: {type: Adam}}"], "deepspeed.optimizer: not allowed"),
    (PRETRAIN, ["train.eval_interval=2"], "data.val_fraction is 0"),
    (PRETRAIN, ["train.eval_interval=2", "data.val_fraction=0.1", "train.eval_samples=0"], "train.eval_samples is 0"),
    (PRETRAIN, ["checkpoint.init_from={root}/missing"], "checkpoint.init_from: {root}/missing does not exist"),
    (PRETRAIN, ["checkpoint.init_from={run_dir}"], "it is a run directory: give one of its checkpoints"),
    (PRETRAIN, ["checkpoint.init_from={shards}/manifest.json"], "is a file; give a checkpoint directory"),
    (PRETRAIN, ["model={name: t, hiden_size: 3}"], "unknown key(s) 'hiden_size'"),
    (PRETRAIN, ["data.paths=[{shards}/manifest.json]"], "manifest.json is a file; give the shard directory"),
    (PRETRAIN, ["data.paths=[{root}/no-such-shards]"], "data.paths: {root}/no-such-shards does not exist"),
    (PRETRAIN, ["data.paths=[no-such-shards]"],
     f"data.paths: no-such-shards does not exist (relative paths are read from the current directory, {REPO_ROOT})"),
    (PRETRAIN, ["model.activation_checkpointing=sometimes"], "activation_checkpointing must be one of none, full"),
    # model.* overrides of a config that names its model (the last --config wins): issue 20 case 6
    (PRETRAIN, ["--config", "{root}/named.yaml", "model.activation_checkpointing=sometimes"],
     "activation_checkpointing must be one of none, full, selective"),
    (PRETRAIN, ["--config", "{root}/named.yaml", "model.hiden_size=8"], "unknown key(s) 'hiden_size'"),
    (PRETRAIN, ["--config", "{root}/named.yaml", "model.activation_checkpointing={a: 1}"], "got {'a': 1}"),
    (PRETRAIN, ["optimizer.lr=[1,"], "override 'optimizer.lr=[1,': the value is not valid YAML"),
    (PRETRAIN, ["run_dir={run_dir}", "model={model_other}"], "holds a different model: hidden_size 32 (checkpoint) vs 64"),
    (PRETRAIN, ["run_dir={run_dir}", "batch.global_batch_size=6", "batch.micro_batch_size=1"],
     "batch.global_batch_size 6 does not divide the 16 samples consumed"),
    # data.stages (the run: 4 steps of 8 x 32 = 256 tokens) and the wsd schedule
    (PRETRAIN, ["data.paths=[]", "data.stages=[]"], "data.stages is empty"),
    (PRETRAIN, ["data.stages=[{paths: [{shards}]}]"], "data.paths and data.stages are both set"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 0}, {paths: [{shards}]}]"],
     "data.stages[0].until_tokens 0 must be positive"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: -256}, {paths: [{shards}]}]"],
     "data.stages[0].until_tokens -256 must be positive"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: half}, {paths: [{shards}]}]"],
     "data.stages[0].until_tokens: expected an integer"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 600}, {paths: [{shards}], until_tokens: 300}, "
                "{paths: [{shards}]}]"], "data.stages[1].until_tokens 300 must be larger than data.stages[0].until_tokens 600"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 100}, {paths: [{shards}], until_tokens: 200}, "
                "{paths: [{shards}]}]"], "ends in the same global batch as data.stages[0].until_tokens 100"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 1024}, {paths: [{shards}]}]"],
     "data.stages[0].until_tokens 1,024 is at or past the run's end (1,024 tokens, 4 steps)"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 256}, {paths: [{shards}], until_tokens: 512}]"],
     "data.stages[1].until_tokens 512: the last stage runs to the end of the run"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}]}, {paths: [{shards}]}]"],
     "data.stages[0].until_tokens is missing"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{until_tokens: 256}, {paths: [{shards}]}]"], "missing required key 'paths'"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [], until_tokens: 256}, {paths: [{shards}]}]"],
     "data.stages[0].paths is empty"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}/manifest.json]}]"],
     "data.stages[0].paths: {shards}/manifest.json is a file"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 256}, {paths: [{shards}], val_fraction: 1.5}]"],
     "data.stages[1].val_fraction 1.5 must be within [0, 1)"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{pahts: [{shards}]}]"], "unknown key(s) 'pahts'"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{name: a, paths: [{shards}], until_tokens: 256}, {name: a, paths: [{shards}]}]"],
     "the stage names ['a', 'a'] repeat"),
    (PRETRAIN, ["data.paths=[]", "data.stages=[{paths: [{shards}], until_tokens: 256}, {paths: [{shards}], "
                "source_weights: {web: 1.0}}]"], "data.stages[1]: source_weights names unknown sources ['web']"),
    (PRETRAIN, ["data.paths=[]", "train.eval_interval=2", "data.stages=[{paths: [{shards}], val_fraction: 0.1, "
                "until_tokens: 256}, {paths: [{shards}]}]"], "data.stages[1].val_fraction is 0"),
    (PRETRAIN, ["data.stages[0].until_tokens=256"], "override 'data.stages[0].until_tokens=256': stages is not a list"),
    (PRETRAIN, ["optimizer.decay_style=linear"], "optimizer.decay_style: 'linear' is not one of 'cosine', 'wsd'"),
    (PRETRAIN, ["optimizer.decay_tokens=512"], "optimizer.decay_tokens applies to decay_style: wsd"),
    (PRETRAIN, ["optimizer.decay_style=wsd"], "give exactly one of optimizer.decay_tokens"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=256", "optimizer.decay_start_tokens=512"],
     "give exactly one of optimizer.decay_tokens"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=0"], "optimizer.decay_tokens 0 must be at least one global batch"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=-256"], "optimizer.decay_tokens -256 must be at least"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=many"], "optimizer.decay_tokens: expected an integer"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=5000"], "optimizer.decay_tokens 5,000 is longer than the run"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=1024"], "starts the decay at step 1, inside the warmup"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_start_tokens=-1"], "optimizer.decay_start_tokens -1 must not be negative"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_start_tokens=1024"], "is at or past the run's end"),
    (PRETRAIN, ["optimizer.decay_style=wsd", "optimizer.decay_tokens=256", "optimizer.decay_shape=exp"],
     "optimizer.decay_shape: 'exp' is not one of 'linear', 'cosine', '1-sqrt'"),
    (PRETRAIN, ["optimizer.allow_schedule_change=maybe"], "optimizer.allow_schedule_change: expected true or false"),
    # reliability (docs/reliability.md)
    (PRETRAIN, ["launch.hang_timeout_s=0"], "launch.hang_timeout_s 0.0 must be a positive number of seconds"),
    (PRETRAIN, ["launch.stop_grace_s=-5"], "launch.stop_grace_s -5.0 must be a positive number of seconds"),
    (PRETRAIN, ["launch.collective_timeout_s=soon"], "launch.collective_timeout_s: expected a number"),
    (PRETRAIN, ["launch.hang_timeout_s=900", "launch.collective_timeout_s=600"],
     "launch.hang_timeout_s 900 must be below launch.collective_timeout_s 600"),
    (PRETRAIN, ["train.straggler_ratio=1"], "train.straggler_ratio 1.0 must be a number above 1"),
    (PRETRAIN, ["train.straggler_ratio=-2"], "train.straggler_ratio -2.0 must be a number above 1"),
    (PRETRAIN, ["train.consistency_check_interval=-1"], "train.consistency_check_interval -1 must be 0 (off)"),
    (PRETRAIN, ["train.consistency_check_interval=1.5"], "train.consistency_check_interval: expected an integer"),
    (PRETRAIN, ["train.divergence.action=retry"], "train.divergence.action: 'retry' is not one of 'skip', 'stop', 'rewind'"),
    (PRETRAIN, ["train.divergence.spike_factor=0.5"], "train.divergence.spike_factor 0.5 must be 0 (off) or a number above 1"),
    (PRETRAIN, ["train.divergence.window=0"], "train.divergence.window 0 must be at least 1"),
    (PRETRAIN, ["train.divergence.max_rewinds=0"], "train.divergence.max_rewinds 0 must be at least 1"),
    (PRETRAIN, ["train.divergence.max_rewind=2"], "unknown key(s) 'max_rewind'"),
    (PRETRAIN, ["train.divergence=rewind"], "train.divergence: expected a mapping"),
    # megamobi.evaluate
    ("megamobi.evaluate:main", ["--checkpoint", "{run_dir}", "--data", "{shards}"], "it is a run directory"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--samples", "0"], "argument --samples"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--batch", "0"], "argument --batch"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}/manifest.json"], "is a file; give the shard"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--seq-len", "48"], "--seq-len 48 must divide"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--seq-len", "128"], "longer than the model's"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--split", "val"], "--split val: "),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--device", "toaster"],
     "--device toaster: unknown device; use cpu, cuda or cuda:N"),
    ("megamobi.evaluate:main", ["--checkpoint", "{ckpt}", "--data", "{shards}", "--device", "cuda:-1"], "--device cuda:-1"),
    # megamobi.generate
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{root}/none.model"], "--tokenizer {root}/none.model: file not found"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{shards}/manifest.json"], "not a SentencePiece model"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok600}"], "600 tokens, more than the vocab_size 512"),
    ("megamobi.generate:main", ["--checkpoint", "{shards}", "--tokenizer", "{tok400}"], "has no megamobi.json"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok400}", "--top-k", "0"], "argument --top-k"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok400}", "--temperature", "-1"], "argument --temperature"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok400}", "--prompt", ""], "argument --prompt"),
    ("megamobi.generate:main", ["--checkpoint", "{ckpt}", "--tokenizer", "{tok400}", "--max-new-tokens", "0"], "--max-new-tokens"),
    # megamobi.checkpoints
    ("megamobi.checkpoints:main", ["{ckpt}"], "it is a checkpoint: give its run directory"),
    ("megamobi.checkpoints:main", ["{root}/nowhere"], "has no checkpoints/ directory"),
    # megamobi.plan
    ("megamobi.plan.__main__:main", ["--config", "{run_yaml}", "--nodes", "0", "--gpus-per-node", "8", "--gpu", "a100-80gb"], "argument --nodes"),
    ("megamobi.plan.__main__:main", ["--config", "{root}/a-dir", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "a100-80gb"], "is a directory"),
    ("megamobi.plan.__main__:main", ["--config", "{run_yaml}", "--nodes", "1", "--gpus-per-node", "2", "--gpu", "b200"], "argument --gpu"),
    ("megamobi.plan.__main__:main", ["--config", "{run_yaml}", "--nodes", "1", "--gpus-per-node", "2", "--gpu", "h100-80gb", "--for-run", "{run_yaml}"], "not a directory"),
    # megamobi.convert
    ("megamobi.convert.__main__:main", ["to-gguf", "--checkpoint", "{ckpt}", "--output", "{root}/a-dir", "--overwrite",
                                        "--no-tokenizer"], "is a directory"),
    # Issue 20 case 12: no tokenizer given and none named by the checkpoint's training data: say what to pass.
    ("megamobi.convert.__main__:main", ["to-hf", "--checkpoint", "{ckpt}", "--output", "{root}/hf-none"],
     "names no tokenizer file that still exists (Amber data, a from-hf import, or moved files); pass --tokenizer"),
    ("megamobi.convert.__main__:main", ["to-gguf", "--checkpoint", "{ckpt}", "--output", "{root}/none.gguf"],
     "or --no-tokenizer to export token ids only"),
    ("megamobi.convert.__main__:main", ["to-hf", "--checkpoint", "{ckpt}", "--output", "{root}/hf-x", "--tokenizer",
                                        "{tok400}", "--no-tokenizer"], "not allowed with argument --tokenizer"),
    ("megamobi.convert.__main__:main", ["to-gguf", "--checkpoint", "{ckpt}", "--output", "{root}/x.gguf",
                                        "--no-tokenizer", "yes"], "unrecognized arguments: yes"),
    ("megamobi.convert.__main__:main", ["from-hf", "--model", "{root}/a-dir", "--output", "{ckpt}"], "pass --overwrite"),
    ("megamobi.convert.__main__:main", ["from-hf", "--model", "{root}/a-dir", "--output", "{shards}"], "not an empty directory"),
    ("megamobi.convert.__main__:main", ["to-hf", "--checkpoint", "{run_dir}", "--output", "{root}/hf"],
     "is a run directory; give one of its checkpoints, e.g. {ckpt}"),
    # data_tools
    ("megamobi.data.cli:preprocess_main", ["--input", "{root}/corpus.txt", "--output", "{root}/corpus.txt"], "--output {root}/corpus.txt: is a file"),
    ("megamobi.data.cli:preprocess_main", ["--input", "x", "--output", "{root}/o", "--chunk-mb", "0"], "argument --chunk-mb"),
    ("megamobi.data.cli:preprocess_main", ["--input", "x", "--output", "{root}/o", "--workers", "0"], "argument --workers"),
    ("megamobi.data.cli:preprocess_main", ["--input", "x", "--output", "{root}/o", "--samples-per-shard", "-1"], "argument --samples-per-shard"),
    ("megamobi.data.cli:inspect_main", ["{shards}/manifest.json"], "is a file; give the shard directory"),
    ("megamobi.data.cli:inspect_main", ["{shards}", "--tokenizer", "{shards}/manifest.json"], "not a SentencePiece model"),
    ("megamobi.data.cli:inspect_main", ["{shards}", "--show", "0", "--tokenizer", "{tok400}"], "not the tokenizer these shards"),
    ("megamobi.data.cli:train_tokenizer_main", ["--input", "{root}/corpus.txt", "--output", "{root}/toks/"], "--output {root}/toks/: is a directory"),
    ("megamobi.data.cli:train_tokenizer_main", ["--input", "{root}/corpus.txt", "--output", "{root}/t", "--vocab-size", "0"], "argument --vocab-size"),
]
# The same mistakes through a genuine command line, one per tool (the table above calls main()).
SUBPROCESS_CASES = [
    (["-m", "megamobi.model", "--config", "{root}/typo.yaml"], "hiden_size"),
    (["-m", "megamobi.pretrain", "--check-only", "--config", "{run_yaml}", "checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    (["-m", "megamobi.evaluate", "--checkpoint", "{ckpt}", "--data", "{shards}", "--seq-len", "48"], "--seq-len 48"),
    (["-m", "megamobi.generate", "--checkpoint", "{ckpt}", "--tokenizer", "{root}/none.model"], "--tokenizer"),
    (["-m", "megamobi.checkpoints", "{ckpt}"], "it is a checkpoint"),
    (["-m", "megamobi.convert", "to-gguf", "--checkpoint", "{ckpt}", "--output", "{root}/a-dir", "--overwrite",
      "--no-tokenizer"], "is a directory"),
    (["data_tools/preprocess_amber.py", "--input", "x", "--output", "{root}/o", "--chunk-mb", "0"], "--chunk-mb"),
    (["data_tools/inspect_shards.py", "{shards}/manifest.json"], "is a file"),
    (["data_tools/train_tokenizer.py", "--input", "{root}/corpus.txt", "--output", "{root}/toks/"], "--output"),
    (["data_tools/stdlib_docs_corpus.py", "--output", "{root}/docs.jsonl", "--stdlib", "{root}/empty-stdlib"], "--stdlib"),
]


def _fill(text: str, world: dict) -> str:
    """Replace {name} for the fixture's paths only (YAML braces in overrides stay as they are)."""
    for key, value in {**world, "model_other": json.dumps({**MODEL, "hidden_size": 64})}.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _argv(entry: str, argv: list[str], world: dict) -> list[str]:
    argv = [_fill(a, world) for a in argv]
    if entry == PRETRAIN:  # config mistakes as overrides of a valid run config
        return ["--check-only", "--config", str(world["run_yaml"]), *argv]
    return argv


def _run_driver(cases: list[tuple[str, list[str]]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={**_env(), "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def outcomes(world):
    """{case index: result} for CASES, one interpreter per tool, the tools in parallel."""
    by_tool: dict[str, list[int]] = {}
    for i, (entry, _, _) in enumerate(CASES):
        by_tool.setdefault(entry.split(":")[0], []).append(i)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {tool: pool.submit(_run_driver, [(CASES[i][0], _argv(CASES[i][0], CASES[i][1], world)) for i in idx])
                   for tool, idx in by_tool.items()}
        return {i: result for tool, idx in by_tool.items() for i, result in zip(idx, futures[tool].result())}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0].split(':')[0].removesuffix('.__main__').split('.')[-1]}-{' '.join(c[1])[:40]}"
                                                          for c in CASES])
def test_user_mistake_exits_2_naming_it(index, outcomes, world):
    expected = CASES[index][2]
    result = outcomes[index]
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert result["code"] == 2, result["stderr"]
    assert _fill(expected, world) in result["stderr"], result["stderr"]


def test_through_the_real_command_lines(world):
    def run(case):
        argv, expected = case
        return subprocess.run([sys.executable, *[_fill(a, world) for a in argv]], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300, env=_env()), _fill(expected, world)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for proc, expected in pool.map(run, SUBPROCESS_CASES):
            assert proc.returncode == 2 and "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr
    # No half-written or hidden outputs were left behind by the refused commands.
    root = world["root"]
    assert not list(root.glob("*.tmp")) and not (root / "docs.jsonl").exists()
    assert not (root / "toks").exists() and not list(root.glob(".model"))


def test_a_tokenizer_smaller_than_the_vocabulary_decodes_every_sampled_id(world):
    """The model's padded vocabulary rows (ids past the tokenizer) are never sampled, so decoding works."""
    for temperature in ("0", "5.0"):
        proc = subprocess.run([sys.executable, "-m", "megamobi.generate", "--checkpoint", str(world["ckpt"]),
                               "--tokenizer", str(world["tok400"]), "--max-new-tokens", "40", "--temperature",
                               temperature, "--top-k", "500"], cwd=REPO_ROOT, capture_output=True, text=True, env=_env())
        assert proc.returncode == 0 and proc.stdout.startswith("The"), proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_cuda_device_on_a_cpu_machine_is_one_line(world):
    """Issue 20 case 8: `--device cuda` where torch has no CUDA is one line from every tool that takes a
    device (megamobi/devices.py), not torch's AssertionError."""
    tools = [["-m", "megamobi.evaluate", "--checkpoint", str(world["ckpt"]), "--data", str(world["shards"])],
             ["-m", "megamobi.eval", "--checkpoint", str(world["ckpt"]), "--tokenizer", str(world["tok400"])],
             ["bench/throughput.py", "--config", "configs/tiny.yaml"]]

    def run(argv):
        return subprocess.run([sys.executable, *argv, "--device", "cuda"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=300, env=_env())

    with ThreadPoolExecutor(max_workers=3) as pool:
        for proc in pool.map(run, tools):
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert "--device cuda: no CUDA device on this machine" in proc.stderr and "use --device cpu" in proc.stderr


def _pretrain(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**_env(), "WORLD_SIZE": "1"})


def test_model_overrides_apply_to_a_named_model(world):
    """Issue 20 case 6: `model: tiny` (a name in configs/) and model.activation_checkpointing=selective
    (its bad values: the table above)."""
    from megamobi.training.run_config import load_run_config

    named = world["root"] / "named.yaml"
    ok = _pretrain("--config", named, "model.activation_checkpointing=selective", "model.rms_norm_eps=1.0e-6")
    assert ok.returncode == 0 and "is valid for 1 process(es)" in ok.stdout, ok.stderr
    run = load_run_config(named, ["model.activation_checkpointing=selective", "model.rms_norm_eps=1.0e-6"])
    assert (run.model_config.name, run.model_config.activation_checkpointing, run.model_config.rms_norm_eps) == (
        "tiny", "selective", 1e-6)


def test_relaunching_a_finished_run_says_so_in_one_line(world):
    """Issue 20 case 13: a run whose newest checkpoint holds its last step: one line, exit 0, and
    launch/pretrain.sh starts no rank (no process group, no rank's output)."""
    args = ["run_dir=" + str(world["run_dir"]), "train.steps=2"]
    line = (f"megamobi: {world['run_dir']} is already complete: step_0000002 holds step 2 of the run's 2; nothing to "
            "train (to train further raise train.steps or train.tokens, with optimizer.allow_schedule_change=true where "
            "that changes the lr schedule)")
    checked = _pretrain("--config", world["run_yaml"], *args)
    assert checked.returncode == 0 and checked.stdout.strip().splitlines()[-1] == line, checked.stdout + checked.stderr
    assert "is valid for 1 process(es)" in checked.stdout  # --check-only still checks and shows the schedule
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE"))}
    launched = subprocess.run(["bash", "launch/pretrain.sh", str(world["run_yaml"]), *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**env, "PYTHON": sys.executable, "NPROC_PER_NODE": "2"})
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.strip().splitlines() == [line] and launched.stderr == ""
