"""Every shell command block in README.md and docs/*.md runs, at tiny scale, or says why not.

The blocks are found generically (```bash / ```sh / ```shell fences). Each command runs with bash in
a sandbox directory laid out like a checkout (configs/, data_tools/, launch/, megamobi/ linked from
the repository) that also holds what the docs assume exists: Amber chunks under amber/train/, raw
text, a SentencePiece tokenizer, a small trained run. Cluster-scale names are replaced by tiny ones
through SUBSTITUTIONS (a 2-step run for runs/mobillama-0.5b, its step_0000002 for step_0002015, ...);
optional arguments written as `[--flag ...]` are dropped; every command must exit 0.

A block that cannot run here is marked in the docs, with the reason, by an HTML comment on the line
before its fence, `<!-- cluster-only: REASON -->` or `<!-- not run: REASON -->`; a single command
by `cluster-only: REASON` or `not run: REASON` in its trailing comment. Unmarked commands must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell")
BLOCK_MARK = re.compile(r"<!--\s*(cluster-only|not run)\b:?\s*(.*?)\s*-->")
LINE_MARK = re.compile(r"(cluster-only|not run:).*")  # anywhere in a command's trailing comment

CKPT = "runs/tiny/checkpoints/step_0000002"
# Cluster-scale names in the docs -> the tiny sandbox (applied in order, as regular expressions).
SUBSTITUTIONS = [
    (r"(^|\s)(\.venv/bin/)?python3?(?=\s)", r"\1" + sys.executable),
    (r"runs/(mobillama-0\.5b|demo)(?=/|\s|$)", "runs/tiny"),
    (r"runs/x/checkpoints/step_\d+|RUN_DIR/checkpoints/step_\d+|\bCKPT\b", CKPT),
    (r"step_\d{7,8}", "step_0000002"),
    (r"\bRUN_DIR\b", "runs/tiny"),
    (r"\bRUN\.yaml\b", "tiny-run.yaml"),
    (r"--steps 2001:2015", "--steps 1:2"),
    (r"\bA:B\b", "1:2"),
    (r"SHARD_DIR:ROW", "data/tiny/shards:0"),
    (r"SHARD\.bin:ROW", "data/tiny/shards/shard_000000_000.bin:0"),
    (r"MobiLlama-05B/", "hf/mobillama"),
    (r"--workers \d+", "--workers 2"),
    # The sandbox run's shards hold token ids, not text: its manifest records no tokenizer to search with.
    (r'(--find-text "[^"]*")', r"\1 --tokenizer SP.model"),
    (r"/data/amber/train/", "amber/train/"),
    (r"/data/shards/", "data/shards/"),
    (r"'/data/redpajama/\*\*/\*\.jsonl\.zst'", "'redpajama/**/*.jsonl.zst'"),
]
# Optional arguments in synopses: `[--flag value]`, nested once (`[--decode [--tokenizer X]]`), `[key.sub=value ...]`.
OPTIONAL = re.compile(r"\s\[(?:--|key\.sub=)(?:[^\[\]]|\[[^\[\]]*\])*\]")


@dataclass
class Command:
    text: str
    skip: str | None = None


@dataclass
class Block:
    where: str
    commands: list[Command] = field(default_factory=list)
    skip: str | None = None


def _strip_comment(line: str) -> tuple[str, str]:
    """(command, comment): a `#` outside quotes that starts a word begins a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def command_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in SHELL_FENCES:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = BLOCK_MARK.search(before)
            block = Block(where=f"{path.relative_to(REPO_ROOT)}:{i + 1}",
                          skip=f"{mark.group(1)}: {mark.group(2)}" if mark else None)
            pending = ""
            for raw in lines[i + 1:end]:
                pending += raw.rstrip()
                if pending.endswith("\\"):
                    pending = pending[:-1] + " "
                    continue
                text, comment = _strip_comment(pending)
                pending = ""
                line_mark = LINE_MARK.search(comment)
                if not text.strip():
                    if line_mark and not block.commands:  # `# cluster-only` as the first line: the whole block
                        block.skip = block.skip or line_mark.group(0)
                    continue
                block.commands.append(Command(text=text.strip(), skip=line_mark.group(0) if line_mark else None))
            blocks.append(block)
        i = end + 1
    return blocks


def tiny(command: str) -> str:
    command = OPTIONAL.sub("", command)
    for pattern, replacement in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return command


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return build_sandbox(tmp_path_factory.mktemp("docs"))


def build_sandbox(root: Path) -> Path:
    """A checkout-like directory holding the inputs and the small trained run the docs assume."""
    from multiproc import run_ranks

    from megamobi.config_io import from_dict
    from megamobi.data.preprocess import PreprocessOptions, preprocess
    from megamobi.data.tokenizer_training import train_tokenizer
    from megamobi.training.loop import Trainer
    from megamobi.training.run_config import RunConfig

    for name in ("configs", "data_tools", "launch", "megamobi", ".venv", "setup.py", "requirements"):
        if (REPO_ROOT / name).exists():
            (root / name).symlink_to(REPO_ROOT / name)
    (root / "logs").mkdir()
    rng = np.random.default_rng(0)
    (root / "amber" / "train").mkdir(parents=True)
    with open(root / "amber" / "train" / "train_000.jsonl", "w") as f:
        for k in range(40):
            f.write(json.dumps({"token_ids": rng.integers(0, 512, 2049).tolist(), "source": ("c4", "arxiv")[k % 2]}) + "\n")
    # The paper config's data.paths (data/amber/shards), built by the docs' own command: blocks that only
    # check or dry-run configs/pretrain-mobillama-0.5b.yaml need it; the blocks that build it find it done.
    subprocess.run([sys.executable, "data_tools/preprocess_amber.py", "--input", "amber/train/", "--output",
                    "data/amber/shards", "--workers", "2", "--no-progress"], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    # Raw text: the standard library's docstrings, as launch/demo.sh uses them.
    subprocess.run([sys.executable, str(REPO_ROOT / "data_tools" / "stdlib_docs_corpus.py"), "--output",
                    str(root / "corpus" / "stdlib.jsonl")], check=True, capture_output=True)
    docs = [json.loads(line)["text"] for line in (root / "corpus" / "stdlib.jsonl").read_text().splitlines()]
    import zstandard

    (root / "redpajama" / "part").mkdir(parents=True)
    (root / "redpajama" / "part" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": "stdlib"}}) + "\n" for d in docs[:200]).encode()))
    (root / "more.txt").write_text("\n\n".join(docs[200:260]) + "\n")
    ascii_text = root / "ascii.txt"
    ascii_text.write_text("\n".join(docs[:300]).encode("ascii", "ignore").decode())
    tokenizer = train_tokenizer(inputs=[str(ascii_text)], output_prefix=str(root / "tokenizer"), vocab_size=512)
    for name in ("tok.model", "SP.model", "llama/tokenizer.model"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, root / name)
    # The small trained run standing in for runs/mobillama-0.5b (and RUN_DIR, RUN.yaml).
    preprocess(PreprocessOptions(inputs=[str(root / "amber" / "train" / "train_000.jsonl")],
                                 output=str(root / "data" / "tiny" / "shards"), vocab_size=512, samples_per_shard=16,
                                 progress=False))
    for alias in ("val/shards", "data/amber-val/shards"):
        (root / alias).parent.mkdir(parents=True, exist_ok=True)
        (root / alias).symlink_to(root / "data" / "tiny" / "shards")
    run_data = {
        "run_dir": "runs/tiny",
        "model": {"name": "doc-tiny", "vocab_size": 512, "hidden_size": 32, "num_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 48, "max_seq_len": 64},
        "data": {"paths": ["data/tiny/shards"], "val_fraction": 0.1, "seed": 3},
        "batch": {"micro_batch_size": 2, "global_batch_size": 4, "seq_len": 64},
        "optimizer": {"warmup_steps": 1}, "train": {"steps": 2, "log_interval": 1}, "precision": "fp32",
        "checkpoint": {"interval_tokens": 4 * 64},
    }
    import yaml

    (root / "tiny-run.yaml").write_text(yaml.safe_dump(run_data))

    def train(rank):
        os.chdir(root)
        run = from_dict(RunConfig, run_data, where="tiny-run.yaml")
        Trainer(run).train()

    run_ranks(train, world_size=1)
    # configs/pretrain-tiny-cpu.yaml in the sandbox: the demo's run, 2 steps on the tiny run's shards.
    tiny_cpu = yaml.safe_load((REPO_ROOT / "configs" / "pretrain-tiny-cpu.yaml").read_text())
    tiny_cpu.update(run_dir="runs/tiny-cpu", data={**tiny_cpu["data"], "paths": ["data/tiny/shards"]})
    tiny_cpu["train"].update(steps=2, eval_interval=0)
    tiny_cpu["optimizer"].update(warmup_steps=1)
    (root / "configs").unlink()
    (root / "configs").mkdir()
    for config in (REPO_ROOT / "configs").iterdir():
        (root / "configs" / config.name).symlink_to(config)
    (root / "configs" / "pretrain-tiny-cpu.yaml").unlink()
    (root / "configs" / "pretrain-tiny-cpu.yaml").write_text(yaml.safe_dump(tiny_cpu))
    return root


def _run_block(block: Block, sandbox: Path) -> list[str]:
    # Each block in its own copy (links kept as links): blocks write the same documented output paths.
    # The inputs and the data directories stay shared (linked): preprocessing resolves paths, so the
    # documented re-run of a finished preprocessing is then the no-op it is for a user.
    root = sandbox.parent / f"{sandbox.name}-{re.sub(r'[^A-Za-z0-9]+', '-', block.where)}"
    shutil.copytree(sandbox, root, symlinks=True, ignore=shutil.ignore_patterns("amber", "data"))
    for shared in ("amber", "data"):
        (root / shared).symlink_to(sandbox / shared)
    from multiproc import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    failures = []
    for command in block.commands:
        if command.skip:
            continue
        text = tiny(command.text)
        proc = subprocess.run(["bash", "-c", text], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failures.append(f"{block.where}: `{command.text}`\n  ran as `{text}`\n  exit {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return failures


ALL_BLOCKS = [block for path in DOCS for block in command_blocks(path)]


def test_blocks_are_found_and_marks_give_reasons():
    assert len(ALL_BLOCKS) >= 10 and all(b.commands for b in ALL_BLOCKS)
    for block in ALL_BLOCKS:
        reasons = [block.skip] if block.skip else []
        reasons += [c.skip for c in block.commands if c.skip]
        assert all(len(r.split(":", 1)[-1].strip()) > 3 or r.startswith("cluster-only") for r in reasons), block


def test_every_unmarked_command_runs_at_tiny_scale(sandbox):
    runnable = [b for b in ALL_BLOCKS if not b.skip]
    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [f for result in pool.map(lambda b: _run_block(b, sandbox), runnable) for f in result]
    assert not failures, "\n\n".join(failures)


HELP_COMMANDS = [
    *(["-m", f"megamobi.{name}"] for name in ("model", "pretrain", "evaluate", "generate", "checkpoints", "convert",
                                               "launcher", "replay", "plan", "eval", "plot")),
    *([f"data_tools/{path.name}"] for path in sorted((REPO_ROOT / "data_tools").glob("*.py"))),
]


def _example_lines(argv: list[str]) -> list[str]:
    """The indented command examples of a tool's module docstring: --help must show each one whole."""
    import ast

    if argv[0] == "-m":
        module = REPO_ROOT / Path(*argv[1].split("."))
        path = module / "__main__.py" if module.is_dir() else module.with_suffix(".py")
        if module.is_dir() and not path.is_file():
            path = module / "__init__.py"
    else:
        path = REPO_ROOT / argv[0]
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [line.strip() for line in doc.splitlines() if line.startswith("    ") and "python" in line]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda a: a[-1])
def test_help_exits_0_and_keeps_the_examples_line_by_line(argv):
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = [" ".join(line.split()) for line in (proc.stdout + proc.stderr).splitlines()]
    for example in _example_lines(argv):
        assert " ".join(example.split()) in shown, f"--help lost the line break before/after: {example}"


def test_launch_script_help_exits_0():
    proc = subprocess.run(["bash", "launch/pretrain.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "pretrain.sh" in proc.stdout, proc.stderr
