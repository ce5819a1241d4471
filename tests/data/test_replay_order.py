"""The replayed data order (megamobi/data/replay.py) on a recorded history of several segments
(different data-parallel sizes, micro-batches, seq_len, a blend that upsamples, a validation split,
several epochs): the inverse lookups agree with the forward listing for every sample, the mix adds
up, and shards that changed since the run are refused. No training: the history is written as a
checkpoint manifest would record it (the real runs are in tests/training/test_replay_runs.py)."""

import json
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from megamobi.data.permutation import FeistelPermutation
from megamobi.data.replay import MIX_CACHE_NAME, ReplayError, RunReplay, consumed_mixes
from megamobi.files import sha256_file


def test_feistel_inverse_undoes_the_permutation():
    for size in (1, 2, 3, 7, 64, 1000, 4097):
        for seed in (0, 5, 2**64 - 1):
            perm = FeistelPermutation(size=size, seed=seed)
            positions = np.arange(size)
            values = perm(positions)
            assert sorted(values.tolist()) == positions.tolist()
            assert np.array_equal(perm.inverse(values), positions)


def _segment(first, last, before, *, shards, gb=8, mb=2, d=2, seq_len=1024, weights=None):
    return {"first_step": first, "last_step": last, "consumed_samples_before": before, "global_batch_size": gb,
            "micro_batch_size": mb, "data_parallel_size": d, "seq_len": seq_len,
            "data": {"paths": [str(shards)], "source_weights": weights, "val_fraction": 0.1, "seed": 3},
            "data_manifests": {str(shards): sha256_file(shards / "manifest.json")}, "data_changed": []}


def _fake_run(tmp_path, shards):
    """Steps 1-20 at D=2 (blend upsampling arxiv, 2 windows per sample), 21-40 at D=4 with micro-batch 1,
    41-50 at D=1 with seq_len 256 and no blend (a change accepted with data.allow_change)."""
    segments = [_segment(1, 20, 0, shards=shards, weights={"c4": 1.0, "arxiv": 3.0}),
                _segment(21, 40, 160, shards=shards, d=4, mb=1, weights={"c4": 1.0, "arxiv": 3.0}),
                _segment(41, 50, 320, shards=shards, d=1, mb=4, seq_len=256)]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000050"
    checkpoint.mkdir(parents=True)
    (checkpoint / "megamobi.json").write_text(json.dumps({"step": 50, "consumed_samples": 400, "data_provenance": segments}))
    return tmp_path / "run"


def test_find_agrees_with_the_forward_listing_for_every_sample(tmp_path, token_shards):
    replay = RunReplay(_fake_run(tmp_path, token_shards))
    listed = defaultdict(list)
    sequences = list(replay.sequences(1, 50))
    assert len(sequences) == 50 * 8
    for seq in sequences:
        listed[seq.sample_index].append((seq.step, seq.rank, seq.micro_batch, seq.offset))
        assert len(seq.tokens) == (1025 if seq.step <= 40 else 257)
    validation = 0
    for sample in range(48):
        answer = replay.find(f"{token_shards}:{sample}")
        got = [(h["step"], h["rank"], h["micro_batch"], h["offset"]) for h in answer["consumed"]]
        assert got == sorted(listed.get(sample, [])), sample
        validation += answer["validation"]
        if answer["validation"]:
            assert not got  # validation sequences are never training data
    assert validation == 5  # round(0.1 * 48)
    # Several epochs and upsampling: samples come back more than once.
    assert max(len(v) for v in listed.values()) > 4
    # The same sample named by its shard file and row.
    seq = sequences[0]
    by_file = replay.find(f"{seq.shard}:{seq.row}")
    assert by_file["sample_index"] == seq.sample_index


def test_ranks_and_micro_batches_follow_each_segments_layout(tmp_path, token_shards):
    replay = RunReplay(_fake_run(tmp_path, token_shards))
    for step, ranks, micro_batch_size in ((1, 2, 2), (21, 4, 1), (45, 1, 4)):
        seqs = list(replay.sequences(step, step))
        assert Counter(s.rank for s in seqs) == {r: 8 // ranks for r in range(ranks)}
        per_rank = [s.micro_batch for s in seqs if s.rank == 0]
        assert per_rank == [i // micro_batch_size for i in range(8 // ranks)]
    assert [s.sample_index for s in replay.sequences(22, 22, rank=3)] == [s.sample_index for s in replay.sequences(22, 22)][6:]


def test_mix_adds_up_to_the_consumed_tokens(tmp_path, token_shards):
    replay = RunReplay(_fake_run(tmp_path, token_shards))
    mix = replay.mix(1, 50)
    assert mix["tokens"] == 40 * 8 * 1024 + 10 * 8 * 256
    counted = Counter()
    for seq in replay.sequences(1, 50):
        counted[seq.source] += len(seq.tokens) - 1
    assert {n: e["tokens"] for n, e in mix["sources"].items() if e["tokens"]} == dict(counted)
    between = json.loads(_cli(replay.run_dir, "--mix", "step_0000020:step_0000040", "--json").stdout)
    assert (between["first_step"], between["last_step"], between["tokens"]) == (21, 40, 20 * 8 * 1024)
    natural = replay.mix(41, 50)  # no blend: configured = the training split's own source shares
    order = replay.order(replay.segments[-1])
    train_sources = order.base.sample_sources()[order.train.base_indices()]
    assert natural["blend"] == "natural"
    for name, entry in natural["sources"].items():
        expected = float(np.mean(train_sources == order.base.sources.index(name)))
        assert abs(entry["configured"] - expected) < 1e-12, name
    blended = replay.mix(1, 40)
    assert blended["blend"] == "weights" and blended["sources"]["arxiv"]["configured"] == 0.75
    assert abs(blended["sources"]["arxiv"]["share"] - 0.75) < 0.1


def test_consumed_mixes_are_cached_per_checkpoint(tmp_path, token_shards):
    run = _fake_run(tmp_path, token_shards)
    first = consumed_mixes(run)["step_0000050"]
    assert set(first) == {"c4", "arxiv"} and abs(sum(first.values()) - 1) < 1e-12
    cache_path = run / MIX_CACHE_NAME
    cache = json.loads(cache_path.read_text())
    assert sum(cache["checkpoints"]["step_0000050"]["tokens"].values()) == 40 * 8 * 1024 + 10 * 8 * 256
    # A second call reads the cache (a planted answer comes back) ...
    cache["checkpoints"]["step_0000050"]["tokens"] = {"c4": 1, "arxiv": 3}
    cache_path.write_text(json.dumps(cache))
    assert consumed_mixes(run)["step_0000050"] == {"c4": 0.25, "arxiv": 0.75}
    # ... unless the checkpoint's recorded history differs from the one cached: replayed again.
    manifest_path = run / "checkpoints" / "step_0000050" / "megamobi.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["data_provenance"][-1]["skipped_steps"] = [50]
    manifest_path.write_text(json.dumps(manifest))
    again = consumed_mixes(run)["step_0000050"]
    assert again != {"c4": 0.25, "arxiv": 0.75}
    assert sum(json.loads(cache_path.read_text())["checkpoints"]["step_0000050"]["tokens"].values()) == 40 * 8 * 1024 + 9 * 8 * 256
    cache_path.write_text("{torn")  # damaged: ignored and rewritten
    assert consumed_mixes(run)["step_0000050"] == again
    assert json.loads(cache_path.read_text())["version"] == 1


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megamobi.replay", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_changed_shards_are_refused(tmp_path, token_shards):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(token_shards, shards)
    run_dir = _fake_run(tmp_path, shards)
    assert _cli(run_dir, "--steps", "1:1").returncode == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["created"] = "rebuilt"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = _cli(run_dir, "--steps", "1:1")
    assert proc.returncode == 2 and "the shards changed since the run trained on them" in proc.stderr
    assert str(shards) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    shutil.rmtree(shards)
    proc = _cli(run_dir, "--mix", "1:2")
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0:3"], "need 1 <= A <= B"),
    (["--steps", "5:2"], "need 1 <= A <= B"),
    (["--steps", "x"], "is not A:B"),
    (["--mix", "1:99"], "covers steps 1..50"),
    (["--steps", "1:1", "--rank", "-1"], "negative"),
    (["--steps", "1:1", "--rank", "2"], "--rank 2: steps 1-1 ran with 2 data-parallel rank(s)"),
    (["--find", "nowhere"], "expected SHARD_DIR:ROW"),
    (["--find", "/elsewhere:3"], "not a shard directory or .bin file of this run"),
    (["--find-text", "hello"], "add --within A:B"),
    (["--mix", "1:2", "--within", "1:2"], "--within bounds --find-text"),
    (["--mix", "1:2", "--rank", "0"], "--rank applies to --steps and --find-text"),
    (["--find-text", " ", "--within", "1:2"], "give a non-empty text"),
    (["--steps", "1:1", "--decode", "--tokenizer", "/no/such.model"], "--tokenizer /no/such.model: no such file"),
    ([], "one of the arguments"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, token_shards, args, message):
    proc = _cli(_fake_run(tmp_path, token_shards), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_run_dir_without_checkpoints_is_refused(tmp_path):
    proc = _cli(tmp_path, "--steps", "1:1")
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = _cli(tmp_path / "file", "--steps", "1:1")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_find_beyond_a_directorys_rows_is_refused(tmp_path, token_shards):
    replay = RunReplay(_fake_run(tmp_path, token_shards))
    with pytest.raises(ReplayError, match="has samples 0..47"):
        replay.find(f"{token_shards}:48")


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory, docs, tokenizer_path):
    """Shards of English text whose manifest records the tokenizer they were made with."""
    from megamobi.data.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("text")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess(PreprocessOptions(inputs=[str(corpus)], output=str(root / "text_shards"), input_format="text",
                                 tokenizer=str(tokenizer_path), samples_per_shard=8, progress=False))
    return root / "text_shards"


def test_find_text_and_decode_on_text_shards(tmp_path, text_shards, tokenizer_path):
    """Text shards with their tokenizer recorded: --find-text lists exactly the sequences whose decoded
    text holds the phrase (checked against decoding every listed sequence), --decode prints the text."""
    import sentencepiece

    shards = text_shards
    segment = _segment(1, 6, 0, shards=shards, d=2, mb=2, seq_len=256)
    segment["data"]["val_fraction"] = 0.0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000006"
    checkpoint.mkdir(parents=True)
    (checkpoint / "megamobi.json").write_text(json.dumps({"step": 6, "consumed_samples": 48, "data_provenance": [segment]}))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    listing = [json.loads(line) for line in _cli(tmp_path / "run", "--steps", "1:6", "--json").stdout.splitlines()]
    texts = [sp.decode(r["tokens"]) for r in listing]
    phrase = " the "
    expected = [(r["step"], r["rank"], r["micro_batch"], r["sample_index"], r["offset"])
                for r, text in zip(listing, texts) if phrase in text]
    assert expected  # the phrase is common English: some sequences hold it
    proc = _cli(tmp_path / "run", "--find-text", phrase, "--within", "1:6", "--json")  # tokenizer from the manifest
    assert proc.returncode == 0, proc.stderr
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["step"], r["rank"], r["micro_batch"], r["sample_index"], r["offset"]) for r in found] == expected
    decoded = _cli(tmp_path / "run", "--steps", "2:2", "--rank", "1", "--decode", "--tokenizer", tokenizer_path).stdout
    assert repr(texts[next(i for i, r in enumerate(listing) if r["step"] == 2 and r["rank"] == 1)]) in decoded


def test_decode_and_find_text_from_another_directory(tmp_path, text_shards):
    """Issue 20 case 7: a run launched in LAUNCH with `data.paths: [shards]` (relative): its checkpoints
    record LAUNCH (launch_dir), so --decode and --find-text find the data's manifest (and through it
    the tokenizer) from any directory; a checkpoint that does not record it gets one line saying
    where to run from, never a traceback."""
    import shutil

    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    shutil.copytree(text_shards, launch / "shards")
    elsewhere.mkdir()
    segment = _segment(1, 6, 0, shards=launch / "shards", d=2, mb=2, seq_len=256)
    segment["data"].update(paths=["shards"], val_fraction=0.0)
    segment["data_manifests"] = {"shards": segment["data_manifests"].pop(str(launch / "shards"))}
    checkpoint = launch / "run" / "checkpoints" / "step_0000006"
    checkpoint.mkdir(parents=True)
    manifest = {"step": 6, "consumed_samples": 48, "data_provenance": [segment], "launch_dir": str(launch)}
    (checkpoint / "megamobi.json").write_text(json.dumps(manifest))
    at_launch = _cli("run", "--steps", "2:2", "--decode", cwd=launch)
    assert at_launch.returncode == 0, at_launch.stderr
    for args in (("--steps", "2:2", "--decode"), ("--find-text", " the ", "--within", "1:6", "--decode")):
        proc = _cli(launch / "run", *args, cwd=elsewhere)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout.strip() and all(line.startswith(("step", "    '", '    "')) for line in proc.stdout.splitlines())
    assert _cli(launch / "run", "--steps", "2:2", "--decode", cwd=elsewhere).stdout == at_launch.stdout.replace(
        "shards/", f"{launch}/shards/")
    del manifest["launch_dir"]  # written before checkpoints recorded it
    (checkpoint / "megamobi.json").write_text(json.dumps(manifest))
    for args in (("--steps", "2:2", "--decode"), ("--find-text", "the", "--within", "1:6"), ("--steps", "2:2")):
        proc = _cli(launch / "run", *args, cwd=elsewhere)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "shards: no manifest.json" in line and f"current directory ({elsewhere})" in line, line
        assert "run this from the directory the training was launched in" in line, line


def test_checkpoints_without_a_recorded_history_are_read_as_a_chain(tmp_path, token_shards):
    """Checkpoints written before data_provenance existed: each covers the steps since the previous one,
    with its own recorded layout and run config."""
    from megamobi.data.replay import checkpoint_segments, read_checkpoint_manifests

    run_config = {"data": {"paths": [str(token_shards)], "source_weights": None, "val_fraction": 0.1, "seed": 3},
                  "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 1024}}
    for step, d in ((4, 2), (8, 2), (12, 1)):
        checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:07d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "megamobi.json").write_text(json.dumps({
            "step": step, "consumed_samples": 8 * step, "layout": {"tensor": 1, "pipeline": 1, "data": d, "zero_stage": 1},
            "run_config": run_config, "data_manifests": {str(token_shards): sha256_file(token_shards / "manifest.json")}}))
    _, manifest = read_checkpoint_manifests(tmp_path / "run")[-1]
    segments = checkpoint_segments(tmp_path / "run", manifest)
    assert [(s.first_step, s.last_step, s.consumed_samples_before, s.data_parallel_size) for s in segments] == [
        (1, 8, 0, 2), (9, 12, 64, 1)]
    replay = RunReplay(tmp_path / "run")
    assert {s.rank for s in replay.sequences(8, 8)} == {0, 1} and {s.rank for s in replay.sequences(9, 12)} == {0}
