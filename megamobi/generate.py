"""Sample text from a megamobi checkpoint (any layout), on CPU or GPU.

    python -m megamobi.generate --checkpoint runs/tiny-cpu/checkpoints/step_0000300 \
        --tokenizer runs/demo-data/tokenizer.model --prompt "Return the" --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import sys

import torch

from megamobi.checkpointing.manifest import checkpoint_model_config
from megamobi.checkpointing.model_files import read_full_model
from megamobi.checkpointing.verified import broken_checkpoint
from megamobi.cli_support import (
    UserError,
    check_tokenizer_fits,
    checkpoint_arg,
    fail,
    load_sentencepiece,
    non_empty,
    non_negative_float,
    positive_int,
)
from megamobi.model import MobiLlama


def load_model(checkpoint: str, *, use: str = "load") -> MobiLlama:
    """The plain model of a checkpoint (any layout); UserError when `checkpoint` is not one, or when its
    files fail the manifest's checksums (`use`: what the caller would do with it, for that message)."""
    checkpoint_arg(checkpoint)
    broken = broken_checkpoint(checkpoint, use=use)
    if broken:
        raise UserError(broken)
    model = MobiLlama(checkpoint_model_config(checkpoint))
    model.load_state_dict(read_full_model(checkpoint))
    return model.eval()


@torch.no_grad()
def generate(model: MobiLlama, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, top_k: int,
             seed: int, eos_id: int | None = None, vocab_limit: int | None = None) -> list[int]:
    """vocab_limit: the tokenizer's size; ids at or past it (the model's padded vocabulary rows) are
    never sampled, so every generated id can be decoded."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.config.max_seq_len:]])
        logits = model(context)[0, -1].float()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / temperature, min(top_k, vocab_limit or logits.numel()))
            next_id = int(indices[torch.multinomial(torch.softmax(values, -1), 1, generator=generator)])
        if next_id == eos_id:
            break
        ids.append(next_id)
    return ids[len(prompt_ids):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamobi.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (RUN_DIR/checkpoints/step_*)")
    parser.add_argument("--tokenizer", required=True, help="the SentencePiece .model the data was made with")
    parser.add_argument("--prompt", default="The", type=non_empty)
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=positive_int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sp = load_sentencepiece(args.tokenizer)
        model = load_model(args.checkpoint, use="generate from")
        check_tokenizer_fits(sp, vocab_size=model.config.vocab_size, what=f"the model in {args.checkpoint}")
    except UserError as err:
        return fail(err)
    new_ids = generate(model, sp.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed, eos_id=sp.eos_id(),
                       vocab_limit=sp.get_piece_size())
    print(args.prompt + ("" if not new_ids else " " * args.prompt.endswith(" ") + sp.decode(new_ids)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
