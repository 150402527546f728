"""count_lines.py -- code lines per file: lines holding a token that is not a comment, a docstring
or layout (blank lines, indentation). The figure the README's file table gives.

    python tests/count_lines.py                 # the project's files
    python tests/count_lines.py train.py        # some of them; --banner: where the core ends
"""

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["model.py", "tokenizer.py", "data.py", "parallel.py", "planner.py", "train.py",
         "generate.py", "eval.py", "checkpoint.py", "cli.py"]
LAYOUT = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
          tokenize.ENCODING, tokenize.ENDMARKER}
BANNER = "# " + "=" * 93          # the one line that ends a file's teaching core


def docstring_lines(source: str) -> set:
    lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source: str) -> list:
    """Sorted line numbers (1-based) that hold code."""
    skip, lines = docstring_lines(source), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in LAYOUT:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return sorted(lines)


def report(path: Path) -> dict:
    source = path.read_text()
    lines = code_lines(source)
    text = source.splitlines()
    banner = next((i + 1 for i, line in enumerate(text) if line.startswith(BANNER)), None)
    core = sum(1 for n in lines if banner is None or n < banner)
    return dict(file=path.name, code=len(lines), core=core, banner=banner, total=len(text))


def main(argv=None):
    names = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")]
    rows = [report(ROOT / n) for n in (names or FILES) if (ROOT / n).exists()]
    print(f"{'file':<14} {'code':>6} {'core':>6} {'banner at':>10} {'lines':>6}")
    for r in rows:
        print(f"{r['file']:<14} {r['code']:>6} {r['core']:>6} {r['banner'] or '-':>10} "
              f"{r['total']:>6}")
    print(f"{'all':<14} {sum(r['code'] for r in rows):>6}")
    return rows


if __name__ == "__main__":
    main()
