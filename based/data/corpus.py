"""Corpora as streams of documents (str): the built-in default and any user corpus given by path.

Default corpus: the documentation that ships inside every CPython install, so nothing is downloaded.
  - every module, class and function docstring of the standard library's .py sources (read with `ast`,
    test suites and site-packages left out, at least 8 words, exact duplicates dropped), and
  - `pydoc_data.topics`, the language-reference topics that `help()` prints.
With CPython 3.11.7: 6,209 docstrings and 79 topics, 2.11 M characters of English (docs/training.md).
It is collected on first use into $BASED_CACHE/corpora (default ~/.cache/based) and shuffled with a
fixed seed, so the validation split, the tail of the token stream, is a random sample of documents
rather than the last modules by name.

User corpora (`--data PATH`): a text file (.txt, .md, .rst, or any other suffix when named directly;
one document per file), JSON lines with a text field (.jsonl, or .json named directly, as Hugging Face
datasets' to_json writes them), Parquet (needs pyarrow), a folder of those (sorted, hidden files skipped)
or a Hugging Face datasets folder written by `save_to_disk` (needs datasets). A file that is not what
its suffix says (a .parquet that is not Parquet, a .json that is one pretty-printed object) is a DataError.
"""
from __future__ import annotations

import ast
import codecs
import hashlib
import json
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
CORPUS_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# Read as JSON lines when named directly. Not picked up from a folder, where .json files are as often
# metadata (a dataset card's, a tokenizer's) as data.
JSON_SUFFIXES = (".jsonl", ".json")
_JSONL_HINT = "a .jsonl/.json corpus holds one JSON object a line, such as {\"text\": \"...\"}"
# Standard-library folders that hold tests, demos or vendored code rather than documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "turtledemo", "_bundled"}
_MIN_WORDS = 8
# Share of a text or JSONL file's bytes that may be other than UTF-8 text (invalid sequences, NUL bytes)
# before it is refused as binary or in another encoding; below it each is read as U+FFFD, with a warning.
MAX_BAD_FRACTION = 0.01
_COUNT_BAD = "based-count-bad-bytes"
_bad_bytes = 0  # invalid UTF-8 bytes the decoder has met (read as a difference around each file)


def _count_bad(error: UnicodeDecodeError) -> tuple[str, int]:
    global _bad_bytes
    _bad_bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(_COUNT_BAD, _count_bad)


class DataError(ValueError):
    """A corpus or tokenizer that cannot be used; the message says what to change."""


def cache_dir() -> Path:
    """$BASED_CACHE, else ~/.cache/based: corpora, tokenizers and tokenized data live here."""
    return Path(os.environ.get("BASED_CACHE") or Path.home() / ".cache" / "based")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def collect_stdlib_docs() -> list[str]:
    """The default corpus' documents, in a fixed shuffled order (same Python, same list)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library was not found at {root}: pass --data PATH")
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    docs.extend(topics[name].strip() for name in sorted(topics))
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in some old modules
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.split()) >= _MIN_WORDS:
                    docs.append(doc)
    docs = list(dict.fromkeys(docs))  # exact duplicates (overridden methods) once
    random.Random(0).shuffle(docs)
    return docs


def default_corpus() -> Path:
    """Path of the default corpus as JSONL ({"text": ...} per line), collected on first call."""
    v = sys.version_info
    path = cache_dir() / "corpora" / f"python-{v.major}.{v.minor}.{v.micro}-stdlib-docs.jsonl"
    if not path.exists():
        lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in collect_stdlib_docs())
        atomic_write_bytes(path, lines.encode())
    return path


def resolve_corpus(data: str | os.PathLike | None) -> Path:
    """--data as a Path (the default corpus when None); a clear error when it does not exist."""
    if data is None:
        return default_corpus()
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"corpus {path} does not exist: pass a text/JSONL/Parquet file or folder with --data")
    return path


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus consists of, in reading order."""
    if path.is_file():
        return [path]
    if not path.is_dir():  # /dev/null, a FIFO: neither a file to read whole nor a folder
        raise DataError(f"corpus {path} is neither a regular file nor a folder: pass a text/JSONL/Parquet file "
                        f"or folder")
    if _is_hf_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"corpus folder {path} holds no {'/'.join(CORPUS_SUFFIXES)} files")
    return files


def corpus_fingerprint(path: Path, text_field: str = "text") -> str:
    """Hash of every file's relative path, size and modification time (like make, without reading
    gigabytes): any edit, addition or removal changes it."""
    h = hashlib.sha256(f"{path.resolve()}\0{text_field}".encode())
    if path.suffix.lower() == ".json" and path.is_file():
        # A .json file was once read as plain text: its cached tokenizers and token streams are not reused.
        h.update(b"json-lines\0")
    root = path if path.is_dir() else path.parent
    for f in corpus_files(path):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_text_bytes(path: Path, bad: int, total: int) -> None:
    """DataError when more than MAX_BAD_FRACTION of a file's bytes are not UTF-8 text, else a warning on
    stderr for any such byte (read as U+FFFD)."""
    if not bad:
        return
    share = f"{bad:,} of {total:,} bytes ({bad / max(total, 1):.2%})"
    if bad > MAX_BAD_FRACTION * total:
        raise DataError(
            f"{path}: {share} are not UTF-8 text (a binary file, or text in another encoding): convert it to "
            f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or leave it out of --data; at most "
            f"{MAX_BAD_FRACTION:.0%} is read, as U+FFFD"
        )
    print(f"warning: {path}: {share} are not UTF-8 text; each is read as U+FFFD", file=sys.stderr, flush=True)


def _text_documents(path: Path) -> Iterator[str]:
    data = path.read_bytes()
    before = _bad_bytes
    text = data.decode("utf-8", errors=_COUNT_BAD)
    check_text_bytes(path, _bad_bytes - before + text.count("\0"), len(data))  # NUL: never in text
    yield text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    before = _bad_bytes
    yield from _jsonl_rows(path, text_field)
    check_text_bytes(path, _bad_bytes - before, path.stat().st_size)


def _jsonl_rows(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors=_COUNT_BAD) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg}): {_JSONL_HINT}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n} is a JSON {type(row).__name__}, not an object: {_JSONL_HINT}")
            if not isinstance(row.get(text_field), str):
                raise DataError(f"{path}:{n} has no string field {text_field!r}: set --text-field")
            yield row[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {names}): set --text-field")
        kind = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {text_field!r} holds {kind}, not text: set --text-field to a string "
                            f"column")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except (pa.ArrowException, OSError) as e:  # a file of another format, truncated, or damaged inside
        raise DataError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())}): pass a Parquet file, "
                        f"or rename it to its real format's suffix") from None


def _hf_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face datasets folder (save_to_disk); reading it needs datasets: pip install datasets"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or partial state.json, dataset_info.json, shards
        reason = " ".join(str(e).split())
        raise DataError(f"{path} looks like a Hugging Face datasets folder but does not load ({reason}): pass a "
                        f"folder save_to_disk wrote") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {ds.column_names}): set --text-field")
    if getattr(ds.features[text_field], "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{path}: column {text_field!r} holds {ds.features[text_field]}, not text: set --text-field "
                        f"to a string column")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        yield from (t for t in batch[text_field] if t is not None)


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Every non-blank document of the corpus at `path`, in a fixed order; DataError when there is none."""
    if _is_hf_dataset(path):
        sources = [_hf_documents(path, text_field)]
    else:
        sources = []
        for f in corpus_files(path):
            suffix = f.suffix.lower()
            if suffix in JSON_SUFFIXES:
                sources.append(_jsonl_documents(f, text_field))
            elif suffix == ".parquet":
                sources.append(_parquet_documents(f, text_field))
            else:
                sources.append(_text_documents(f))
    empty = True
    for source in sources:
        for doc in source:
            if doc.strip():
                empty = False
                yield doc
    if empty:
        raise DataError(f"corpus {path} holds no text")
