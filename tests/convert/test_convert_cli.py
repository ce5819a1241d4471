"""`python -m megamobi.convert`: exit 0 on success, one clear line and exit 2 on a user mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from convert_helpers import save_checkpoint

from megamobi.convert.__main__ import main


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megamobi.convert", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_round_trip_and_errors(checkpoints, repo_root, tmp_path):
    ckpt, _ = checkpoints["gqa"]
    ok = run_cli("to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32",
                 "--max-shard-size", "200KB", "--no-tokenizer", cwd=repo_root)
    assert ok.returncode == 0, ok.stderr
    assert "wrote Hugging Face model" in ok.stdout and "to-hf" in ok.stderr  # the tqdm bar
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2

    back = run_cli("from-hf", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                   "--ffn-sharing", "shared", cwd=repo_root)
    assert back.returncode == 0, back.stderr
    assert "shared FFN, 2 KV heads" in back.stdout and (tmp_path / "ck" / "megamobi.json").is_file()

    # A user mistake: one line on stderr, exit 2, no traceback.
    refused = run_cli("to-hf", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"), cwd=repo_root)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "checkpoint directory not found" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_cli_in_process_errors(checkpoints, tmp_path, capsys):
    # The same entry point in-process (cheap): every refusal is exit code 2 with an `error:` line.
    model = checkpoints["per_layer"][1]
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    assert main(["to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32",
                 "--no-tokenizer"]) == 0
    assert main(["from-hf", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "c"), "--ffn-sharing", "shared"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "MLP copies differ" in err and "model.layers.1.mlp.gate_proj.weight (layer 1)" in err
    (ckpt / "model" / "tp00-pp00.safetensors").unlink()
    assert main(["to-gguf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.gguf"), "--no-tokenizer"]) == 2
    assert "broken or incomplete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown choice
        main(["to-gguf", "--checkpoint", str(ckpt), "--output", "m.gguf", "--dtype", "q4_0"])
    assert exc.value.code == 2


def test_exports_find_the_tokenizer_of_the_training_data(checkpoints, sp_model_path, tmp_path, repo_root):
    """Issue 20 case 12: without --tokenizer, to-hf and to-gguf ship the tokenizer the checkpoint's
    training data names (its shards' manifest.json, as megamobi.eval finds it), also when the run
    recorded its data path relative to the directory it was launched from; --no-tokenizer ships none."""
    import shutil

    from megamobi.checkpointing.manifest import read_manifest, write_manifest
    from megamobi.files import sha256_file

    gguf = pytest.importorskip("gguf")
    launch = tmp_path / "launch"  # where the run was started; its data.paths said `shards`
    (launch / "shards").mkdir(parents=True)
    (launch / "shards" / "manifest.json").write_text(json.dumps(
        {"tokenizer": {"path": str(sp_model_path), "sha256": sha256_file(sp_model_path)}}))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["shared"][0], ckpt)
    manifest = read_manifest(ckpt)
    write_manifest(ckpt, model_config=checkpoints["shared"][1].config,
                   info={k: manifest[k] for k in ("step", "consumed_samples", "consumed_tokens")} |
                        {"run_config": {"data": {"paths": ["shards"]}}, "launch_dir": str(launch)})
    hf = run_cli("to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32", cwd=tmp_path)
    assert hf.returncode == 0, hf.stderr
    assert f"tokenizer: {sp_model_path} (named by the training data's manifest.json)" in hf.stdout
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    out = run_cli("to-gguf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.gguf"), "--dtype", "f32",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    bare = run_cli("to-gguf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "ids.gguf"), "--no-tokenizer",
                   cwd=tmp_path)
    assert bare.returncode == 0 and "named by the training data" not in bare.stdout, bare.stderr
    field = gguf.GGUFReader(str(tmp_path / "ids.gguf")).fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "no_vocab"
    # The tokenizer changed since the data was made (another sha256): not the data's tokenizer; refused.
    (launch / "shards" / "manifest.json").write_text(json.dumps({"tokenizer": {"path": str(sp_model_path),
                                                                               "sha256": "0" * 64}}))
    refused = run_cli("to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf2"), cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "pass --tokenizer FILE.model" in refused.stderr and not (tmp_path / "hf2").exists()
