"""The configuration reference, docs/configuration.md, generated from the comments in megatrain/config.py (and
model_config.py, the model section).

    python -m megatrain.config_docs > docs/configuration.md    # regenerate the page
    python -m megatrain.config_docs --check                     # exit 1 when the committed page differs

A key's documentation is the comment lines right above its field (at the field's indentation, no blank line between)
followed by the comment at the end of the field's line; a section's is its class docstring. A comment line indented
apart from the next field (deeper, or with its text pushed right: a continuation under a field's line) is an error,
since it would belong to no key.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

from megatrain import config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMAND = "python -m megatrain.config_docs > docs/configuration.md"


def sections() -> dict[str, type]:
    """{section name: its dataclass}, in Config's order."""
    hints = typing.get_type_hints(config.Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(config.Config)}


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its documentation (empty when it has none)} of one section class, read from its source."""
    source = inspect.getsource(cls)
    comments = {}  # line number in `source` -> (column, text, whether the line holds nothing but the comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            alone = not tok.line[:col].strip()
            if alone and tok.string.startswith("#  "):  # a hanging indent: # followed by more than one space
                col = -1
            comments[row] = (col, tok.string.lstrip("#").strip(), alone)
    first_line = inspect.getsourcelines(cls)[1]
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][2]:
            col, text, _ = comments[row]
            if col != node.col_offset:
                raise ValueError(f"{inspect.getsourcefile(cls)}:{first_line + row - 1}: a comment line indented "
                                 f"apart from the field below it (a continuation of the line above?) belongs to "
                                 f"no key; write a long comment above the field it documents, as '# text'")
            above.insert(0, text)
            row -= 1
        trailing = [comments[r][1] for r in range(node.lineno, node.end_lineno + 1)
                    if r in comments and not comments[r][2]]
        docs[node.target.id] = " ".join(t for t in above + trailing if t)
    return docs


def section_doc(cls: type) -> str:
    """The class docstring of a section, as one paragraph (empty when it has none)."""
    doc = ast.get_docstring(ast.parse(inspect.getsource(cls)).body[0]) or ""
    return " ".join(doc.split())


def key_docs() -> dict[str, str]:
    """{'section.key': its documentation} for every key of every section."""
    return {f"{name}.{key}": doc for name, cls in sections().items() for key, doc in field_docs(cls).items()}


def default_text(f: dataclasses.Field) -> str:
    """A field's default as it would be written in YAML."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if value == "":
        return '""'
    return str(value)


def cell(text: str) -> str:
    """Text for a Markdown table cell: a pipe would end the cell, an asterisk start emphasis."""
    return text.replace("|", r"\|").replace("*", r"\*")


def render() -> str:
    """The whole page."""
    classes = sections()
    n_keys = sum(len(dataclasses.fields(cls)) for cls in classes.values())
    out = ["# Configuration reference", "",
           f"*Generated from the comments in `megatrain/config.py` by `{COMMAND}`; do not edit this page by hand: "
           "change the comment there and run the command again (a test fails when the two differ).*", "",
           "A run's config is these defaults, then a YAML file or a preset from `configs/` (`--config NAME`), then "
           "`--set section.key=value` overrides (repeatable; the value is read as YAML). A YAML file holds one "
           "mapping per section:", "",
           "```yaml", "train:", "  max_steps: 1000", "parallel:", "  zero_stage: 2", "```", "",
           "An unknown key, a value of the wrong type or an impossible combination stops the run at once with one "
           "line naming the key.", "",
           f"{n_keys} keys in {len(classes)} sections: " + ", ".join(f"[{name}](#{name})" for name in classes) + "."]
    for name, cls in classes.items():
        docs = field_docs(cls)
        out += ["", f"## {name}", ""]
        if section_doc(cls):
            out += [section_doc(cls), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            if not docs.get(f.name):
                raise ValueError(f"config key {name}.{f.name} has no comment in megatrain/config.py; document it "
                                 f"there (the comment lines above its field, or one at the end of its line)")
            typ = str(f.type).replace(" | ", " or ").replace("None", "null")
            out.append(f"| `{name}.{f.name}` | {cell(typ)} | `{cell(default_text(f))}` | {cell(docs[f.name])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatrain.config_docs",
                                     description="Print docs/configuration.md, generated from megatrain/config.py.")
    parser.add_argument("--check", nargs="?", const=str(PAGE), metavar="PAGE",
                        help="compare with the committed page (or PAGE) instead: exit 1 when they differ")
    args = parser.parse_args(argv)
    try:
        page = render()
    except ValueError as e:
        print(f"megatrain.config_docs: error: {e}", file=sys.stderr)
        return 2
    if args.check is None:
        sys.stdout.write(page)
        return 0
    path = Path(args.check)
    if not path.is_file() or path.read_text(encoding="utf-8") != page:
        print(f"{path} differs from the comments in megatrain/config.py: regenerate it with `{COMMAND}`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
