"""Write a small English corpus that exists on every machine: the docstrings of Python's standard library.

    python data_tools/stdlib_docs_corpus.py --output runs/demo-data/stdlib_docs.jsonl

One JSON line per module ({"text": ..., "meta": {"source": "stdlib-docs", "module": ...}}), in
sorted path order, so the corpus (and every demo run built from it) is the same on every machine
with the same Python version.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path


def module_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d.strip() for d in docs if d and len(d.split()) >= 5]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args(argv)
    if not args.stdlib.is_dir():
        print(f"error: --stdlib {args.stdlib}: not a directory", file=sys.stderr)
        return 2
    if args.output.is_dir():
        print(f"error: --output {args.output}: is a directory; give a .jsonl file name", file=sys.stderr)
        return 2
    files = sorted(p for p in args.stdlib.rglob("*.py")
                   if not ({"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(p.relative_to(args.stdlib).parts)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    documents = words = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for path in files:
            docs = module_docstrings(path)
            if not docs:
                continue
            text = "\n\n".join(docs)
            module = ".".join(path.relative_to(args.stdlib).with_suffix("").parts)
            out.write(json.dumps({"text": text, "meta": {"source": "stdlib-docs", "module": module}}) + "\n")
            documents += 1
            words += len(text.split())
    if not documents:
        tmp.unlink()
        print(f"error: --stdlib {args.stdlib}: no Python files with docstrings found there (nothing written); "
              "give the standard library's directory (the default)", file=sys.stderr)
        return 2
    tmp.replace(args.output)
    print(f"wrote {documents} documents, {words:,} words to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
