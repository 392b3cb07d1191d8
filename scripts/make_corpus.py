"""Generate pipelines/data/corpus.txt.gz: English-ish technical prose for the char LM.

Run ONCE by a maintainer; the output is committed so every machine trains on the same
bytes (the text depends on the Python version that generated it, the committed file does
not). The text is the docstrings of a fixed list of standard-library modules, their
classes and functions, in a fixed order, folded onto the 96-character vocabulary of
pipelines.data (newline + printable ASCII): tabs become spaces, other characters are
dropped, runs of blank lines collapse.

    python scripts/make_corpus.py [--max-bytes 1000000] [--out pipelines/data/corpus.txt.gz]
"""

import argparse
import gzip
import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pickletools",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
]

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))


def docstrings(module):
    seen = set()

    def emit(obj):
        doc = inspect.getdoc(obj)
        if doc and id(doc) not in seen and len(doc) > 40:
            seen.add(id(doc))
            yield doc

    yield from emit(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield from emit(obj)
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                    yield from emit(member)


def fold(text):
    text = text.replace("\t", "    ")
    text = "".join(c for c in text if c in VOCAB)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--out", default="pipelines/data/corpus.txt.gz")
    args = parser.parse_args(argv)
    parts, size = [], 0
    for modname in MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        for doc in docstrings(module):
            piece = fold(doc)
            parts.append(piece)
            size += len(piece)
        if size >= args.max_bytes:
            break
    text = "".join(parts)[: args.max_bytes]
    # mtime=0 and no file name in the gzip header: same text -> same bytes.
    with (
        open(args.out, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f,
    ):
        f.write(text.encode("ascii"))
    print(
        f"{args.out}: {len(text)} characters from Python {sys.version.split()[0]}, "
        f"{Path(args.out).stat().st_size} bytes compressed"
    )


if __name__ == "__main__":
    main()
