"""Write an instruction set built from what ships with Python: "What does `json.dumps` do?" -> the first paragraph
of its docstring, for the public functions, classes and methods of a list of standard-library modules.

    python scripts/stdlib_sft.py data/stdlib_sft      # -> train.jsonl, validation.jsonl, one {"messages": [...]} a line

Validation holds out whole modules (a module is held out when a hash of its name falls under
--validation_fraction), so held-out questions are about modules the model never trained on; its rows are
interleaved across modules, so its first rows sample every held-out module. The same Python gives the same
files, byte for byte. Docstrings that say nothing are skipped: none, inherited
from a base class, a bare signature line with nothing after it, boilerplate ("Initialize self.  See
help(type(self))..."), under MIN_WORDS words. Long first paragraphs keep their first sentences up to
MAX_CHARS characters. The answers are Python's own documentation, so the set needs no download. Run it in
a process of its own (as here): packages imported first can patch the standard library (torch replaces
inspect.getfile, transformers adds logging.Logger.warning_once), and their additions are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

MODULES = """
abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections collections.abc
colorsys concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis email.utils
enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html
html.parser http.client http.cookies http.server imaplib inspect io ipaddress itertools json keyword linecache
locale logging logging.handlers lzma mailbox math mimetypes numbers operator os os.path pathlib pickle pkgutil
platform plistlib poplib pprint queue quopri random re reprlib sched secrets select selectors shelve shlex
shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys
sysconfig tarfile tempfile textwrap threading time timeit token tokenize tomllib traceback types typing
unicodedata unittest urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree
zipfile zlib
""".split()

MIN_WORDS = 4
MAX_CHARS = 400
BOILERPLATE = ("Initialize self", "Return repr(self)", "See help(type(self))", "Create and return a new object")
# a line that is a call signature: name(args) [-> result]
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(-{1,2}>.*)?$")
# old C-style heads before the description: "S.append(value) -- ...", "int, int, int -> ...", "[sep] -> ..."
SIGNATURE_HEAD = re.compile(r"^(?:[\w.]+\(.*?\)|[\w\s,\[\]*]{0,40}?)\s*(?:-->|->|--)\s*(?=\S)")
QUESTION = "What does `{}` do?"


def first_paragraph(doc: str | None) -> str | None:
    """The first descriptive paragraph of a docstring, on one line; None when there is nothing to say."""
    if not doc:
        return None
    paragraphs = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(doc)) if p.strip()]
    while paragraphs and SIGNATURE.match(paragraphs[0].strip().splitlines()[0].strip()):
        paragraphs.pop(0)  # "dumps(obj, ...)" or "S.split(...) -> list": a signature, not a description
    if not paragraphs:
        return None
    text = " ".join(paragraphs[0].split()).replace("``", "`")
    head = SIGNATURE_HEAD.match(text)
    if head:
        text = text[head.end() :]
        text = text[0].upper() + text[1:]
    if len(text.split()) < MIN_WORDS or text.startswith(BOILERPLATE) or "<==>" in text:
        return None
    return shorten(text, MAX_CHARS)


def shorten(text: str, limit: int) -> str | None:
    """Whole sentences up to `limit` characters; None if even the first is longer."""
    if len(text) <= limit:
        return text
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = ""
    for sentence in sentences:
        if len(kept) + len(sentence) + 1 > limit:
            break
        kept = f"{kept} {sentence}".strip()
    return kept or None


def own_doc(obj, owner=None) -> str | None:
    """The object's own docstring: not one a class inherits, not the owner class's (a descriptor's)."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    if inspect.isclass(obj) and any(doc == getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
        return None
    if owner is not None and doc == owner.__doc__:
        return None
    return doc


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return sorted(set(names))


def defined_here(obj, module) -> bool:
    """Defined by this module or a private helper of it (_json, posixpath for os.path), not re-exported."""
    home = getattr(obj, "__module__", None)
    return home is None or home == module.__name__ or home.startswith("_")


def entries(display: str, module) -> list[tuple[str, str]]:
    """(qualified name, answer) for the module's public functions and classes and the classes' public methods."""
    out = []
    for name in public_names(module):
        obj = getattr(module, name, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)) or not defined_here(obj, module):
            continue
        answer = first_paragraph(own_doc(obj))
        if answer:
            out.append((f"{display}.{name}", answer))
        if inspect.isclass(obj):
            out += methods(f"{display}.{name}", obj)
    return out


def methods(qualified: str, cls) -> list[tuple[str, str]]:
    out = []
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        home = getattr(function, "__module__", None)
        if home is not None and home.split(".")[0] not in (cls.__module__.split(".")[0], "") and not home.startswith("_"):
            continue  # patched in by a third-party package (transformers adds logging.Logger.warning_once)
        if inspect.isroutine(function):
            answer = first_paragraph(own_doc(function, owner=cls))
            if answer:
                out.append((f"{qualified}.{name}", answer))
    return out


def held_out(module_name: str, fraction: float) -> bool:
    """Deterministic across runs and machines (not Python's salted hash)."""
    digest = hashlib.sha256(module_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build(modules: list[str], validation_fraction: float) -> tuple[list[dict], list[dict]]:
    train, validation, seen = [], [], set()
    for display in modules:
        try:
            module = importlib.import_module(display)
        except ImportError:  # a module this Python build lacks (e.g. no _ssl): skip it, say so
            print(f"skipping {display}: not importable here")
            continue
        split = validation if held_out(display, validation_fraction) else train
        for qualified, answer in entries(display, module):
            if qualified in seen:
                continue
            seen.add(qualified)
            messages = [{"role": "user", "content": QUESTION.format(qualified)}, {"role": "assistant", "content": answer}]
            split.append({"messages": messages, "name": qualified, "module": display})
    return train, validation


def interleaved(rows: list[dict]) -> list[dict]:
    """Rows taken from each module in turn (the first of every module, then the second, ...), so that the
    first N rows (main.py's --max_eval_samples) sample every held-out module, not only the first one."""
    by_module: dict[str, list[dict]] = {}
    for row in rows:
        by_module.setdefault(row["module"], []).append(row)
    queues = list(by_module.values())
    out = []
    for depth in range(max(map(len, queues), default=0)):
        out += [queue[depth] for queue in queues if depth < len(queue)]
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", nargs="?", default="data/stdlib_sft", help="where train.jsonl and validation.jsonl go")
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="share of modules held out (by name hash)")
    args = parser.parse_args(argv)
    train, validation = build(MODULES, args.validation_fraction)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", interleaved(validation))
    held = sorted({row["module"] for row in validation})
    print(f"wrote {len(train)} training and {len(validation)} validation examples to {out} (held-out modules: {', '.join(held)})")
    return out / "train.jsonl", out / "validation.jsonl"


if __name__ == "__main__":
    main()
