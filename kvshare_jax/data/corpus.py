"""An English corpus shipped with Python itself, so experiments need no download.

Documents are the entries of ``pydoc_data.topics.topics`` (the language reference
pages behind ``help()``) and, for a fixed list of standard-library modules, the
docstrings of each module read from its source with ``ast`` (nothing is imported).
About 1.5 MB of text on CPython 3.11. The corpus is identical across runs and
processes of the same Python installation; other Python versions give slightly
different text. Module text is parsed lazily, on first access of that document.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import threading
from collections.abc import Sequence

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05

# Standard-library modules whose docstrings hold at least ~3 KB of prose (CPython 3.11),
# sorted. Modules missing from the running Python are skipped.
MODULES = (
    "_collections_abc _pydecimal _pyio _strptime argparse ast asyncio.base_events "
    "asyncio.events asyncio.futures asyncio.locks asyncio.protocols asyncio.sslproto "
    "asyncio.streams asyncio.tasks asyncio.transports asyncio.unix_events base64 bdb bz2 "
    "calendar cmd code codecs collections compileall concurrent.futures._base "
    "concurrent.futures.process configparser contextlib dataclasses datetime difflib dis "
    "email._header_value_parser email._policybase email.charset email.generator "
    "email.header email.headerregistry email.message email.policy email.quoprimime "
    "email.utils enum fileinput fractions ftplib functools graphlib gzip heapq http.client "
    "http.cookiejar http.cookies http.server imaplib importlib._bootstrap "
    "importlib._bootstrap_external importlib.abc importlib.metadata inspect ipaddress json "
    "json.decoder json.encoder locale logging logging.config logging.handlers lzma mailbox "
    "mimetypes numbers optparse os pathlib pdb pickle pickletools pkgutil platform poplib "
    "py_compile pydoc queue random re selectors shelve shutil site smtplib socket "
    "socketserver ssl statistics subprocess tarfile tempfile textwrap threading timeit "
    "tokenize traceback turtle typing urllib.parse urllib.request uuid wave "
    "wsgiref.handlers wsgiref.validate xml.etree.ElementTree xml.sax.handler "
    "xml.sax.xmlreader xmlrpc.client xmlrpc.server zipfile zipimport"
).split()

_STDLIB = os.path.dirname(os.__file__)
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def split_by_hash(keys: Sequence[str], fraction: float = VALIDATION_FRACTION) -> dict[str, list]:
    """Deterministically splits ``keys`` into sorted ``train`` / ``validation`` lists.

    The ``max(1, round(fraction * n))`` keys with the smallest SHA-256 go to validation
    (none when there is a single key), so the split never depends on ``hash()`` seeds.
    """
    ranked = sorted(set(keys), key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    n_val = max(1, round(fraction * len(ranked))) if len(ranked) > 1 else 0
    return {"train": sorted(ranked[n_val:]), "validation": sorted(ranked[:n_val])}


def _module_path(name: str) -> str | None:
    base = os.path.join(_STDLIB, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _docstrings(node: ast.AST) -> list[str]:
    """Docstrings of ``node`` and its nested classes and functions, in source order."""
    out = []
    if isinstance(node, _DOCSTRING_NODES) and (doc := ast.get_docstring(node)):
        out.append(doc)
    for child in getattr(node, "body", ()):
        if isinstance(child, _DOCSTRING_NODES):
            out.extend(_docstrings(child))
    return out


@functools.cache
def _titles() -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    titles = [f"topic:{key}" for key in topics]
    titles += [f"module:{name}" for name in MODULES if _module_path(name)]
    return split_by_hash(titles)


# ast.parse is not thread-safe on CPython 3.11 ("AST constructor recursion depth
# mismatch" under grain's reader threads), so parsing is serialised.
_PARSE_LOCK = threading.Lock()


@functools.cache
def document(title: str) -> str:
    """Text of the document ``title`` (``topic:<pydoc topic>`` or ``module:<name>``)."""
    kind, _, name = title.partition(":")
    if kind == "topic":
        from pydoc_data.topics import topics

        return topics[name]
    with open(_module_path(name), encoding="utf-8") as f:
        source = f.read()
    with _PARSE_LOCK:
        tree = ast.parse(source)
    return "\n\n".join(_docstrings(tree))


def document_titles(split: str) -> list[str]:
    """Sorted titles of the documents in ``split`` (``"train"`` or ``"validation"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the embedded corpus; expected {SPLITS}")
    return list(_titles()[split])


def embedded_documents(split: str) -> list[str]:
    """All document texts of ``split``, in title order."""
    return [document(t) for t in document_titles(split)]


class EmbeddedSource:
    """Random-access source of ``{"text": str}`` over one split of the embedded corpus."""

    def __init__(self, split: str):
        self._titles = document_titles(split)

    def __len__(self) -> int:
        return len(self._titles)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"text": document(self._titles[index])}

    def __repr__(self) -> str:
        return f"EmbeddedSource(num_documents={len(self)})"
