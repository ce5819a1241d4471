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
                 "--max-shard-size", "200KB", cwd=repo_root)
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
    assert main(["to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert main(["from-hf", "--model", str(tmp_path / "hf"), "--output", str(tmp_path / "c"), "--ffn-sharing", "shared"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "MLP copies differ" in err and "model.layers.1.mlp.gate_proj.weight (layer 1)" in err
    (ckpt / "model" / "tp00-pp00.safetensors").unlink()
    assert main(["to-gguf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.gguf")]) == 2
    assert "broken or incomplete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown choice
        main(["to-gguf", "--checkpoint", str(ckpt), "--output", "m.gguf", "--dtype", "q4_0"])
    assert exc.value.code == 2
