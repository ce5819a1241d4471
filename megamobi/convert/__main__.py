"""`python -m megamobi.convert {to-hf,from-hf,to-gguf}`: user mistakes end as one line on stderr and exit 2.

to-hf and to-gguf ship the tokenizer: `--tokenizer FILE.model`, else the one the checkpoint's training
data names in its manifest.json (as megamobi.eval finds it), else they refuse and say what to pass;
`--no-tokenizer` exports without a vocabulary (token ids only).
"""

from __future__ import annotations

import argparse
import sys

from megamobi.config_io import ConfigError
from megamobi.convert.errors import ConversionError
from megamobi.convert.to_hf import DEFAULT_MAX_SHARD_SIZE


def _tokenizer_options(parser: argparse.ArgumentParser, purpose: str) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--tokenizer", help=f"SentencePiece tokenizer.model {purpose} (default: the one the "
                                            "checkpoint's training data names in its manifest.json)")
    choice.add_argument("--no-tokenizer", action="store_true",
                        help="export without a tokenizer (a model that takes token ids only)")


def choose_tokenizer(args: argparse.Namespace) -> str | None:
    """--tokenizer, nothing with --no-tokenizer, else the training data's tokenizer; a ConversionError
    saying what to pass when there is none. A directory that is no readable checkpoint is left to the
    exporter, whose message says what it is instead."""
    if args.no_tokenizer or args.tokenizer:
        return args.tokenizer
    from megamobi.checkpointing.manifest import read_manifest
    from megamobi.checkpointing.recorded_paths import training_tokenizer

    try:
        manifest = read_manifest(args.checkpoint)
    except (OSError, ValueError):
        return None
    found = training_tokenizer(manifest)
    if found is None:
        raise ConversionError(f"--checkpoint {args.checkpoint}: its training data names no tokenizer file that still "
                              "exists (Amber data, a from-hf import, or moved files); pass --tokenizer FILE.model (the "
                              "SentencePiece model the data was made with), or --no-tokenizer to export token ids only")
    print(f"tokenizer: {found} (named by the training data's manifest.json)", flush=True)
    return str(found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megamobi.convert",
                                     description="Convert megamobi checkpoints to and from Hugging Face and GGUF.")
    sub = parser.add_subparsers(dest="command", required=True)

    to_hf = sub.add_parser("to-hf", help="checkpoint -> Hugging Face directory (stock LlamaForCausalLM)")
    to_hf.add_argument("--checkpoint", required=True, help="megamobi checkpoint directory (any TP/PP layout)")
    to_hf.add_argument("--output", required=True, help="output directory (new or empty)")
    to_hf.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    _tokenizer_options(to_hf, "to ship with the model")
    to_hf.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 2GB (default), 500MB, 4GiB")
    to_hf.add_argument("--no-inv-freq", action="store_true",
                       help="leave out the per-layer rotary_emb.inv_freq the released checkpoints store")
    to_hf.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")

    from_hf = sub.add_parser("from-hf", help="Hugging Face Llama / MobiLlama -> checkpoint at step 0")
    from_hf.add_argument("--model", required=True, help="Hugging Face model directory (config.json + weights)")
    from_hf.add_argument("--output", required=True, help="new checkpoint directory")
    from_hf.add_argument("--name", help="model name in the checkpoint's config (default: from config.json or the directory)")
    from_hf.add_argument("--ffn-sharing", choices=["auto", "shared", "per_layer"], default="auto",
                         help="auto: shared when every layer's MLP copy is bitwise identical")
    from_hf.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                         help="precision of the written weights (default fp32, the training master weights)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace a megamobi checkpoint already at --output")

    to_gguf = sub.add_parser("to-gguf", help="checkpoint -> GGUF file for llama.cpp")
    to_gguf.add_argument("--checkpoint", required=True, help="megamobi checkpoint directory (any TP/PP layout)")
    to_gguf.add_argument("--output", required=True, help="output .gguf file")
    to_gguf.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    _tokenizer_options(to_gguf, "for the GGUF vocabulary")
    to_gguf.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Each command imports only its own module; the gguf package is needed by to-gguf alone.
    try:
        if args.command == "to-hf":
            from megamobi.convert.to_hf import export_hf

            export_hf(args.checkpoint, args.output, dtype=args.dtype, tokenizer=choose_tokenizer(args),
                      max_shard_size=args.max_shard_size, include_inv_freq=not args.no_inv_freq,
                      overwrite=args.overwrite, progress=True)
            print(f"wrote Hugging Face model to {args.output}")
        elif args.command == "from-hf":
            from megamobi.convert.from_hf import import_hf

            config = import_hf(args.model, args.output, name=args.name, ffn_sharing=args.ffn_sharing, dtype=args.dtype,
                               overwrite=args.overwrite)
            print(f"wrote megamobi checkpoint to {args.output} ({config.name}: {config.num_layers} layers, "
                  f"{config.ffn_sharing} FFN, {config.kv_heads} KV heads)")
        else:
            from megamobi.convert.to_gguf import export_gguf

            export_gguf(args.checkpoint, args.output, dtype=args.dtype, tokenizer=choose_tokenizer(args),
                        overwrite=args.overwrite, progress=True)
            print(f"wrote GGUF file {args.output}")
    except (ConversionError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
