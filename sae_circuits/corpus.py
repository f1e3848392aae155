"""The corpus of the embedded model, generated deterministically from a seed.

The build trains the model on the "train" split; at run time it is the default text of the
embedded model (training dictionaries on "train", evaluating them on "heldout"), and its
standard-library text is the default sample of English and code for any other model.

Documents of three kinds are interleaved so that each kind's share of characters follows `MIX`:
- "ioi": one IOI sentence freshly rendered by the grammar from a training shape (a share
  `ABC_SHARE` of them name three people);
- "sva": 1-3 subject-verb-agreement sentences, rendered from training shapes;
- "text": real text shipped with Python and with the packages the project depends on
  (`TEXT_PACKAGES`): docstrings, full-line comment blocks and short function definitions of their
  `.py` files (tests excluded), found with `ast`.
The "heldout" split uses the held-out shapes and a disjoint 10% of the text files (chosen by a hash
of the file path, so the split does not depend on the seed).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import itertools
import random
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from sae_circuits.errors import UserInputError
from sae_circuits.task_text import SPLITS, ioi_sentence, sva_sentence

MIX = {"ioi": 0.45, "sva": 0.20, "text": 0.35}  # target share of characters per kind
ABC_SHARE = (
    0.15  # share of IOI sentences with three distinct names (answer: either of the first two)
)
SVA_ATTRACTOR_SHARE = 0.5  # share of SVA distractor nouns that have the other number
# installed packages whose sources give text, with folders left out (transformers' per-model code
# repeats one docstring per model)
TEXT_PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": (),
    "torch": (),
    "transformers": ("models",),
    "networkx": (),
    "matplotlib": (),
    "rich": (),
}
EXCLUDED_DIRS = {
    "test",
    "tests",
    "site-packages",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "__pycache__",
    "testing",
    "_vendor",
    "benchmarks",
}
MAX_FUNCTION_LINES = 12
MAX_DOC_CHARS = 2000


def stdlib_dir() -> Path:
    """The `Lib/` folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def _file_split(rel: str) -> str:
    return "heldout" if hashlib.sha1(rel.encode()).digest()[0] % 10 == 0 else "train"


def _python_files(
    root: Path, split: str, prefix: str, excluded: tuple[str, ...] = ()
) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts) or (rel.parts and rel.parts[0] in excluded):
            continue
        if _file_split(prefix + rel.as_posix()) == split:
            files.append(path)
    return files


def stdlib_files(split: str) -> list[Path]:
    """Standard-library source files of a split, sorted by path."""
    return _python_files(stdlib_dir(), split, "")


def package_dir(name: str) -> Path | None:
    """The folder of an installed package (None if it is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def text_files(split: str) -> list[Path]:
    """Every text source file of a split: the standard library's, then each of `TEXT_PACKAGES`'
    (those installed), each sorted by path."""
    return list(_text_files(split))


@lru_cache(maxsize=2)
def _text_files(split: str) -> tuple[Path, ...]:
    files = stdlib_files(split)
    for name, excluded in TEXT_PACKAGES.items():
        root = package_dir(name)
        if root is not None:
            files += _python_files(root, split, f"{name}/", excluded)
    return tuple(files)


def _comment_blocks(lines: list[str]) -> Iterator[str]:
    block: list[str] = []
    for line in [*lines, ""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            block.append(stripped)
        elif block:
            if sum(len(b) for b in block) >= 40:
                yield "\n".join(block)
            block = []


def extract_text(source: str) -> list[str]:
    """Docstrings, comment blocks and short function definitions of one Python source file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    docs: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 20:
                docs.append(doc)
        if (
            isinstance(node, ast.FunctionDef)
            and node.end_lineno is not None
            and node.end_lineno - node.lineno < MAX_FUNCTION_LINES
        ):
            segment = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
            if segment.strip():
                docs.append(segment)
    docs.extend(_comment_blocks(lines))
    return [d[:MAX_DOC_CHARS] for d in docs]


def _documents(files: list[Path]) -> tuple[str, ...]:
    docs: list[str] = []
    for path in files:
        docs.extend(extract_text(path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise RuntimeError(f"no text found in the source files (first: {files[:1]})")
    return tuple(docs)


@lru_cache(maxsize=2)
def stdlib_documents(split: str) -> tuple[str, ...]:
    """The standard library's real-text documents of a split, in a fixed order."""
    return _documents(stdlib_files(split))


def text_documents(split: str, seed: int = 0) -> Iterator[str]:
    """All real-text documents of a split (`text_files`), file by file, the files in an order
    shuffled by `seed` (so that any prefix mixes every source)."""
    files = text_files(split)
    random.Random(f"text-files-{split}-{seed}").shuffle(files)
    for path in files:
        yield from extract_text(path.read_text(encoding="utf-8", errors="replace"))


def _text_stream(split: str, seed: int) -> Iterator[str]:
    for epoch in itertools.count():  # endless: the files in a new order every epoch
        yield from text_documents(split, seed * 1_000_003 + epoch)


def iter_corpus(split: str = "train", seed: int = 0, abc_share: float = ABC_SHARE) -> Iterator[str]:
    """Endless deterministic stream of documents; the kind with the largest deficit against `MIX`
    (in characters so far) comes next. `abc_share` of the IOI sentences name three people."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    rng = random.Random(f"corpus-{split}-{seed}")
    text = _text_stream(split, seed)
    chars = dict.fromkeys(MIX, 0)
    while True:
        total = sum(chars.values()) + 1
        kind = max(MIX, key=lambda k: MIX[k] - chars[k] / total)
        if kind == "text":
            doc = next(text)
        elif kind == "ioi":
            doc = ioi_sentence(rng, split, abc=rng.random() < abc_share)
        else:
            k = rng.randint(1, 3)
            doc = " ".join(sva_sentence(rng, split, SVA_ATTRACTOR_SHARE) for _ in range(k))
        chars[kind] += len(doc)
        yield doc


def corpus_recipe(seed: int, abc_share: float = ABC_SHARE) -> dict[str, object]:
    """The corpus settings recorded in the model card."""
    return {
        "seed": seed,
        "mix_chars": MIX,
        "ioi_abc_share": abc_share,
        "sva_attractor_share": SVA_ATTRACTOR_SHARE,
        "stdlib": f"Python {sys.version.split()[0]} Lib/**/*.py minus {sorted(EXCLUDED_DIRS)}",
        "stdlib_train_files": len(stdlib_files("train")),
        "stdlib_heldout_files": len(stdlib_files("heldout")),
        "packages": {
            name: importlib.metadata.version(name)
            for name in TEXT_PACKAGES
            if package_dir(name) is not None
        },
        "package_excluded": {name: list(dirs) for name, dirs in TEXT_PACKAGES.items() if dirs},
        "text_train_files": len(text_files("train")),
        "text_heldout_files": len(text_files("heldout")),
        "text_sources": "docstrings, full-line comment blocks, functions under "
        f"{MAX_FUNCTION_LINES} lines (each cut at {MAX_DOC_CHARS} characters)",
    }
