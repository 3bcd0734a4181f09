"""Long texts that every Debian/Python machine already has: the raw material of the training prompts.

Two sources, both read from local disk so that dumps need no download:

* the Python standard library's own ``.py`` source files;
* the Debian package documentation under ``/usr/share/doc`` (READMEs, changelogs, NEWS files, plain-text and
  HTML manuals, gzipped or not).

Evaluation keeps its own text: RULER uses Paul Graham essays, SQuAD and HotpotQA (never read here) and the
planted-fact demo uses the docstrings of ``flashmemory.bench.corpus.STDLIB_MODULES``. Those modules are left
out of the stdlib source, and so is any other file that repeats one of their docstring paragraphs (``abc.py``
carries ``ABCMeta``'s, for instance), so no evaluation passage can leak into training.
"""

from __future__ import annotations

import functools
import hashlib
import html
import inspect
import os
import re
import sysconfig
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..bench.corpus import STDLIB_MODULES, stdlib_paragraphs

STDLIB_KIND = "stdlib_source"
DEBIAN_DOC_KIND = "debian_doc"

DEBIAN_DOC_ROOT = Path("/usr/share/doc")
MIN_DOC_CHARS = 2000
MAX_DOC_BYTES = 400_000

# Folders of the stdlib tree that are not prose-or-code worth reading: tests, third-party packages, compiled
# extensions, the generated codec tables of ``encodings`` and the 750 KB generated ``pydoc_data`` dump.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "lib-dynload"})
_STDLIB_SKIP_TOP = frozenset({"encodings", "pydoc_data"})

# Licence texts are the same boilerplate in hundreds of packages; reading them again teaches nothing.
_BOILERPLATE_PREFIXES = ("copyright", "copying", "license", "licence")
_BINARY_SUFFIXES = frozenset({
    ".png", ".gif", ".jpg", ".jpeg", ".svg", ".ico", ".bmp", ".pdf", ".ps", ".eps", ".dvi", ".woff", ".woff2",
    ".ttf", ".otf", ".js", ".css", ".json", ".map", ".inv", ".zip", ".bz2", ".xz", ".tgz", ".deb", ".so",
    ".a", ".o", ".pyc", ".class", ".jar", ".db", ".bin", ".gpg", ".sig", ".asc",
})  # fmt: skip
_HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# A training-side guard for the demo's fact template ("The access code of the ... is ...").
_EVAL_MARKERS = (b"access code",)

# Bytes that do not occur in text; deleting every other byte counts them at C speed.
_TEXT_BYTES = bytes(b for b in range(256) if b not in {*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F})
_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_BREAK = re.compile(r"</?(?:br|p|div|h[1-6]|li|tr|pre|dt|dd|table|ul|ol|hr|title)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One source text.

    ``doc_id`` is its path: ``stdlib/<path inside the stdlib folder>`` for the standard library (so it does
    not depend on where Python is installed) and the absolute path for ``/usr/share/doc`` files.
    """

    doc_id: str
    text: str
    kind: str


def stdlib_source_documents() -> list[SourceDocument]:
    """The standard library's ``.py`` files, minus tests, site-packages and the evaluation modules.

    Returns:
        Documents sorted by ``doc_id``, each at least ``MIN_DOC_CHARS`` long; files over ``MAX_DOC_BYTES``
        are skipped (cutting code in the middle would break the ``ast`` questions built on it).
    """
    return list(_stdlib_source_documents())


def debian_doc_documents() -> list[SourceDocument]:
    """Text files of ``/usr/share/doc``: plain, gzipped or HTML (tags stripped), without licence boilerplate.

    Returns:
        Documents sorted by ``doc_id``, each at least ``MIN_DOC_CHARS`` long and read up to ``MAX_DOC_BYTES``
        (long changelogs are cut at a line end). A text shipped by several packages (the same changelog
        under ``gpg``, ``gpgv``, ``gpg-agent`` ...) is kept once, under its first path, so the
        train/validation split cannot hold it twice.
    """
    return list(_debian_doc_documents())


def split_documents(
    docs: Iterable[SourceDocument], *, validation_fraction: float = 0.1
) -> tuple[list[SourceDocument], list[SourceDocument]]:
    """Split documents into train and validation by a stable hash of ``doc_id``.

    Args:
        docs: the documents, in any order; the order is kept within each part.
        validation_fraction: the share of documents, in expectation, that go to validation.

    Returns:
        ``(train, validation)``. A document's side depends only on its ``doc_id``, so it is the same on every
        machine and in every process, and it never changes when other documents come or go.
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    train: list[SourceDocument] = []
    validation: list[SourceDocument] = []
    for doc in docs:
        (validation if _unit_hash(doc.doc_id) < validation_fraction else train).append(doc)
    return train, validation


def excluded_stdlib_top_levels() -> frozenset[str]:
    """Top-level stdlib names that evaluation uses (``http.client`` excludes the whole ``http`` package)."""
    return frozenset(name.split(".")[0] for name in STDLIB_MODULES)


def _unit_hash(doc_id: str) -> float:
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@functools.cache
def _stdlib_source_documents() -> tuple[SourceDocument, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = excluded_stdlib_top_levels() | _STDLIB_SKIP_TOP
    with warnings.catch_warnings():
        # Reading docstrings touches deprecated aliases such as typing.io; their warnings are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        eval_paragraphs = frozenset(stdlib_paragraphs())
    docs: list[SourceDocument] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        parts = rel_dir.parts
        if parts and (parts[0] in excluded or parts[0].startswith("config-")):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py") or (not parts and name[:-3] in excluded):
                continue
            if name.startswith("_sysconfigdata"):
                continue  # this machine's build settings, different on every install
            path = Path(dirpath) / name
            try:
                if path.is_symlink() or path.stat().st_size > MAX_DOC_BYTES:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            text = data.decode("utf-8", errors="replace")
            if len(text) < MIN_DOC_CHARS or _has_eval_text(data) or _repeats_docstring(text, eval_paragraphs):
                continue
            docs.append(SourceDocument((Path("stdlib") / rel_dir / name).as_posix(), text, STDLIB_KIND))
    return tuple(sorted(docs, key=lambda d: d.doc_id))


def _repeats_docstring(source: str, paragraphs: frozenset[str]) -> bool:
    """Whether a triple-quoted string in ``source`` has a paragraph the evaluation corpus also has."""
    # The evaluation corpus normalises docstrings exactly like this (getdoc = cleandoc, split on blank lines,
    # collapse whitespace), so set membership finds a copied docstring without parsing the file.
    for match in _TRIPLE_QUOTED.finditer(source):
        doc = inspect.cleandoc(match.group(1) or match.group(2) or "")
        for para in doc.split("\n\n"):
            if " ".join(para.split()) in paragraphs:
                return True
    return False


@functools.cache
def _debian_doc_documents(root: Path = DEBIAN_DOC_ROOT) -> tuple[SourceDocument, ...]:
    docs: list[SourceDocument] = []
    seen: set[bytes] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        # Package doc folders are often links to a sibling package's folder: walking them would only repeat.
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            read = _read_doc_file(path)
            if read is None or len(read[0]) < MIN_DOC_CHARS:
                continue
            text, digest = read
            if digest in seen:
                continue
            seen.add(digest)
            docs.append(SourceDocument(path.as_posix(), text, DEBIAN_DOC_KIND))
    return tuple(sorted(docs, key=lambda d: d.doc_id))


def _read_doc_file(path: Path) -> tuple[str, bytes] | None:
    """The text of one documentation file and a digest of its bytes.

    Returns:
        ``(text, digest)``, or None for a link, licence boilerplate, a binary or an unreadable file.
    """
    lower = path.name.lower()
    gz = lower.endswith(".gz")
    base = lower[:-3] if gz else lower
    if base.startswith(_BOILERPLATE_PREFIXES) or os.path.splitext(base)[1] in _BINARY_SUFFIXES:
        return None
    try:
        if path.is_symlink():
            return None
        with open(path, "rb") as fh:
            data = fh.read() if gz else fh.read(MAX_DOC_BYTES + 1)
        if gz:
            # One C call with an output cap: gzip.open's buffered reader took a quarter of the load time.
            data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_DOC_BYTES + 1)
    except (OSError, zlib.error):
        return None
    if len(data) > MAX_DOC_BYTES:
        data = data[: data.rfind(b"\n", 0, MAX_DOC_BYTES) + 1]
    if len(data.translate(None, _TEXT_BYTES)) > 0.002 * max(1, len(data)) or _has_eval_text(data):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Old Debian changelogs are often Latin-1; binary data is caught by the control-character test below.
        text = data.decode("latin-1")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if base.endswith(_HTML_SUFFIXES):
        text = _strip_html(text)
    return text, hashlib.blake2b(data, digest_size=16).digest()


def _strip_html(text: str) -> str:
    text = _HTML_BREAK.sub("\n", _HTML_DROP.sub("", text))
    text = html.unescape(_HTML_TAG.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    # str.replace runs at C speed where a regex for runs of newlines crawls over large pages.
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip() + "\n"


def _has_eval_text(data: bytes) -> bool:
    # bytes.lower only folds ASCII, which is all the markers need, and is far faster than str.lower.
    lower = data.lower()
    return any(marker in lower for marker in _EVAL_MARKERS)


def all_documents(kinds: Sequence[str] = (STDLIB_KIND, DEBIAN_DOC_KIND)) -> list[SourceDocument]:
    """Both sources together (or those named in ``kinds``), sorted by ``doc_id``.

    Args:
        kinds: which sources, by ``SourceDocument.kind``.
    """
    docs: list[SourceDocument] = []
    if STDLIB_KIND in kinds:
        docs.extend(_stdlib_source_documents())
    if DEBIAN_DOC_KIND in kinds:
        docs.extend(_debian_doc_documents())
    return sorted(docs, key=lambda d: d.doc_id)
