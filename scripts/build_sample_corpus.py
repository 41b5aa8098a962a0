#!/usr/bin/env python3
"""Build the small real-text sample corpus shipped in data/sample/.

Three gzip-compressed JSON-lines files, one {"text", "source"} object per line:

  web.jsonl.gz   documentation prose: Node.js docs (MIT) and CMake Help pages (BSD-3-Clause)
  code.jsonl.gz  Python standard-library source files (PSF-2.0)
  math.jsonl.gz  math-heavy docstrings from sympy and mpmath (BSD-3-Clause)

Stdlib only. The output depends only on the files on this machine: file lists are
sorted, selection order comes from a hash of each document's source (no RNG), and
gzip headers carry mtime=0, so a rerun here gives byte-identical files. Another
machine (other Node/CMake/Python/sympy versions) gives different bytes; the
committed files are the reference.

Usage: .venv/bin/python scripts/build_sample_corpus.py [--out data/sample]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import inspect
import json
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Each output stops taking documents once this many characters of text are in it,
# so every file lands at roughly 1.2-1.3 MB of text.
CHAR_CAP = 1_200_000
# One huge file (e.g. _pydecimal.py) should not crowd out everything else.
MAX_DOC_CHARS = 60_000
# Below this a "document" is a stub (one-line CMake variable pages, empty __init__.py).
MIN_DOC_CHARS = 300

NODE_DOCS = Path("/usr/share/doc/nodejs")
CMAKE_HELP = Path("/usr/share/cmake-3.25/Help")
# Web sources are recorded relative to /usr/share, so the path says which package they came from.
SHARE = Path("/usr/share")

# The prose-heavy parts of the CMake Help; the variable/property pages are mostly one-liners.
CMAKE_DIRS = ("manual", "command", "policy", "release", "cpack_gen", "generator")

# Stdlib directories that are tests, demos, vendored wheels or the IDE, not library code;
# encodings/ and pydoc_data/ are mostly generated tables and strings.
STDLIB_SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3",
    "ensurepip", "site-packages", "dist-packages", "__pycache__",
    "encodings", "pydoc_data",
}


# --------------------------------------------------------------------------- helpers

def read_text(path: Path) -> str | None:
    """Strict UTF-8 decode; a file that is not valid UTF-8 is skipped, not repaired."""
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError):
        return None


def truncate(text: str, limit: int = MAX_DOC_CHARS) -> str:
    """Cut to at most `limit` chars, at the last line boundary before it."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut] if cut > 0 else text[:limit]


def hash_key(doc: dict) -> str:
    # Taking documents in sorted order would fill the cap with whatever sorts first
    # (all of asyncio/, all of sympy/algebras/...). Ordering by a hash of the source
    # spreads the sample over the whole tree and is still fully deterministic.
    return hashlib.sha256(doc["source"].encode("utf-8")).hexdigest()


def select(candidates: list[dict], cap: int = CHAR_CAP) -> list[dict]:
    """Take documents in hash order until `cap` characters; return them in source order."""
    chosen, total = [], 0
    for doc in sorted(candidates, key=hash_key):
        if total >= cap:
            break
        chosen.append(doc)
        total += len(doc["text"])
    # Source order makes the files easy to read and diff.
    return sorted(chosen, key=lambda d: d["source"])


def make_doc(text: str, source: str) -> dict | None:
    text = truncate(text.strip()).strip()
    if len(text) < MIN_DOC_CHARS:
        return None
    return {"text": text, "source": source}


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and a fixed compresslevel keep the gzip bytes reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(
        filename=path.name, mode="wb", fileobj=raw, compresslevel=9, mtime=0
    ) as gz:
        for doc in docs:
            # ASCII-escaped JSON: no character that str.splitlines() treats as a line
            # break (U+2028, U+0085, ...) can end up inside a line.
            line = json.dumps({"text": doc["text"], "source": doc["source"]}, ensure_ascii=True)
            gz.write(line.encode("utf-8") + b"\n")


# --------------------------------------------------------------------------- web

HTML_COMMENT = re.compile(r"<!--.*?-->\n?", re.DOTALL)


def split_markdown_sections(text: str) -> list[tuple[str, str]]:
    """Split a Node API page at its '## ' headings: one document per section.

    The pages are long (fs.md is ~300 kB), so whole files would mostly be truncated.
    The page intro (before the first '## ') becomes its own section.
    """
    sections, title, lines = [], "intro", []
    in_fence = False
    for line in text.split("\n"):
        if line.startswith("```"):
            in_fence = not in_fence  # a '## ' inside a code block is not a heading
        if not in_fence and line.startswith("## "):
            sections.append((title, "\n".join(lines)))
            title, lines = line[3:].strip(), []
        lines.append(line)
    sections.append((title, "\n".join(lines)))
    return sections


def node_docs() -> list[dict]:
    docs = []
    if not NODE_DOCS.is_dir():
        return docs
    # API reference pages, split into sections. The <!-- ... --> blocks are YAML
    # metadata (added-in versions, changes tables), not prose, so they are dropped.
    for path in sorted(NODE_DOCS.glob("api/*.md")):
        text = read_text(path)
        if text is None:
            continue
        rel = path.relative_to(SHARE).as_posix()
        for title, body in split_markdown_sections(HTML_COMMENT.sub("", text)):
            doc = make_doc(body, f"{rel}::{title}")
            if doc:
                docs.append(doc)
    # Contributor guides and top-level docs: plain prose, one document per file.
    # The changelogs are long lists of commit titles, so they are left out.
    guides = sorted(NODE_DOCS.glob("*.md")) + sorted(NODE_DOCS.glob("contributing/**/*.md"))
    for path in guides:
        if path.name == "CHANGELOG.md":
            continue
        text = read_text(path)
        if text is None:
            continue
        doc = make_doc(HTML_COMMENT.sub("", text), path.relative_to(SHARE).as_posix())
        if doc:
            docs.append(doc)
    return docs


def cmake_docs() -> list[dict]:
    docs = []
    for sub in CMAKE_DIRS:
        for path in sorted((CMAKE_HELP / sub).glob("*.rst")):
            text = read_text(path)
            if text is None:
                continue
            doc = make_doc(text, path.relative_to(SHARE).as_posix())
            if doc:
                docs.append(doc)
    return docs


def build_web() -> tuple[list[dict], dict]:
    node, cmake = node_docs(), cmake_docs()
    info = {"node_candidates": len(node), "cmake_candidates": len(cmake)}
    return select(node + cmake), info


# --------------------------------------------------------------------------- code

def build_code() -> tuple[list[dict], dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Sources are recorded as e.g. "python3.11/json/decoder.py".
    base = stdlib.parent
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        rel_parts = path.relative_to(stdlib).parts
        if any(p in STDLIB_SKIP_DIRS for p in rel_parts[:-1]):
            continue
        if rel_parts[0].startswith("config-") or path.name.startswith(("test_", "_sysconfigdata")):
            continue  # build configuration and generated sysconfig data, not library code
        text = read_text(path)
        if text is None:
            continue
        doc = make_doc(text, path.relative_to(base).as_posix())
        if doc:
            docs.append(doc)
    return select(docs), {"candidates": len(docs), "stdlib": str(stdlib)}


# --------------------------------------------------------------------------- math

# Words and markup that mark a docstring as being about mathematics rather than API plumbing.
MATH_WORDS = re.compile(
    r"sqrt|integral|integrat|derivative|\\frac|\\int|\\sum|\\sqrt|\\pi|\\infty|\$"
    r"|\*\*|\bpi\b|\boo\b|\bexp\(|\blog\(|\bsin\(|\bcos\(|polynomial|matrix|eigen|series"
    r"|\bprime|equation|\bzeta\b|gamma|theorem|\bmod\b"
)
MATH_CHARS = set("0123456789=+-*/^()")


def looks_math_heavy(text: str) -> bool:
    # Two signals: enough digits/operators in the text, and at least two distinct math
    # words or markup. Either alone lets through parameter lists or argument-checking prose.
    density = sum(c in MATH_CHARS for c in text) / len(text)
    distinct = {m.group(0) for m in MATH_WORDS.finditer(text)}
    return density >= 0.05 and len(distinct) >= 2


def package_dir(name: str) -> Path | None:
    # find_spec on a top-level package locates it without importing it (sympy is slow to import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# mpmath keeps most of its function documentation as module-level strings in this
# file (attached to the functions at import time), not as ast-visible docstrings.
DOC_STRING_MODULES = {"mpmath/function_docs.py"}


def docstrings(tree: ast.Module, rel: str):
    """Yield (qualified name, docstring) for the module and every class/function in it."""
    doc = ast.get_docstring(tree)
    if doc:
        yield "<module>", doc
    if rel in DOC_STRING_MODULES:
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                # Same dedent as a real docstring gets.
                yield node.targets[0].id, inspect.cleandoc(node.value.value)

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name + ".")

    yield from walk(tree, "")


def build_math() -> tuple[list[dict], dict]:
    docs, versions = [], {}
    for name in ("sympy", "mpmath"):
        pkg = package_dir(name)
        if pkg is None:
            print(f"warning: {name} not installed, skipped", file=sys.stderr)
            continue
        versions[name] = str(pkg)
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(pkg.parent)
            if any(p in ("tests", "test", "benchmarks") for p in rel.parts):
                continue
            text = read_text(path)
            if text is None:
                continue
            try:
                tree = ast.parse(text, filename=str(path))
            except SyntaxError:
                continue
            for qualname, doc_text in docstrings(tree, rel.as_posix()):
                doc = make_doc(doc_text, f"{rel.as_posix()}::{qualname}")
                if doc and looks_math_heavy(doc["text"]):
                    docs.append(doc)
    return select(docs), {"candidates": len(docs), "packages": versions}


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "sample")
    args = ap.parse_args()

    for name, build in (("web", build_web), ("code", build_code), ("math", build_math)):
        docs, info = build()
        if not docs:
            print(f"error: no documents for {name}", file=sys.stderr)
            return 1
        out = args.out / f"{name}.jsonl.gz"
        write_jsonl_gz(out, docs)
        chars = sum(len(d["text"]) for d in docs)
        print(f"{out}: {len(docs)} docs, {chars:,} chars of text, "
              f"{out.stat().st_size:,} bytes gzipped  {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
