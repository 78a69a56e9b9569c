"""The input guards: what is refused before DuckDB reads a file (an archive that would unpack
too far, is corrupt or escapes its folder; binary data, over-long lines, stray carriage returns
or a truncated ``.gz`` in a text file; an unreadable or duplicated header), and
:class:`SourceError`, the error every reader raises with the path and what to do.

No Dagster import: this is plain Python, testable alone.
"""

from __future__ import annotations

import csv
import gzip
import zipfile
import zlib
from collections.abc import Collection
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import is_storage_failure, storage_error

# Archives bigger than this when unpacked are refused before anything is written:
# ml-32m unpacks to about 1 GB, so 8 GiB leaves room for real data and stops a zip bomb.
# RECSYS_MAX_UNPACK_BYTES overrides it.
MAX_UNPACKED_BYTES = 8 * 1024**3
# Archives with more members than this are refused before anything is written: MovieLens
# zips hold 5 to 25 files, so tens of thousands of (empty) members is a hostile or wrong
# archive, each member costing a file and its checks. RECSYS_MAX_ZIP_MEMBERS overrides it.
MAX_ZIP_MEMBERS = 10_000
# The longest line a text input may have (RECSYS_MAX_LINE_BYTES overrides it). Real rows
# are a few hundred bytes; a longer line means a corrupt file or lost line breaks, and
# DuckDB would hold the whole line in memory (a 200 MB line costs about 400 MB of RAM).
MAX_LINE_BYTES = 1 << 20


class SourceError(ValueError):
    """The input cannot be read as asked; the message names the path and what was expected."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes in messages people read."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The first lines of a library's error, without its advice for other APIs, capped at
    ``limit`` characters (DuckDB quotes whole input lines and lists its own options)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(ln for ln in lines[:2] if not ln.startswith(("Original Line", "Possible")))
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def _wanted(name: str, only: Collection[str]) -> bool:
    """A member named in ``only``, at the archive's top or one folder down (where the
    layouts look); without ``only``, every member."""
    parts = PurePosixPath(name).parts
    return not only or (0 < len(parts) <= 2 and parts[-1] in only and parts[0] != "__MACOSX")


def unpack_zip(
    archive: Path,
    dest: Path,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_members: int = MAX_ZIP_MEMBERS,
    only: Collection[str] = (),
) -> Path:
    """Unpack the members of ``archive`` named in ``only`` (file names, at the top or one
    folder down; all members when empty) into ``dest`` (a scratch folder); the archive is
    only read, and what the layout does not read is never written.

    Refuses archives with more than ``max_members`` members, whose members would unpack past
    ``max_bytes`` (declared, checked before anything is written, or actual, checked while
    writing), encrypted members, member names that would escape ``dest``, and corrupt or
    truncated archives (bad CRC, sizes that lie), each with a :class:`SourceError` naming
    the archive and what to do.
    """
    limit = f"the limit of {human_bytes(max_bytes)} (RECSYS_MAX_UNPACK_BYTES={max_bytes})"
    fix = (
        "If the archive is trusted, raise RECSYS_MAX_UNPACK_BYTES, or unpack it yourself and "
        "point RECSYS_DATA_PATH at the folder."
    )
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(
            f"{archive} is not a readable zip archive ({exc}); re-download or re-copy it."
        ) from exc
    member = None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise SourceError(
                f"{archive} holds {len(infos)} members, over the limit of {max_members} "
                f"(RECSYS_MAX_ZIP_MEMBERS={max_members}); nothing was unpacked. A MovieLens archive "
                "holds a few dozen at most: check it is the right file, or if it is trusted, raise "
                "RECSYS_MAX_ZIP_MEMBERS or unpack it yourself and point RECSYS_DATA_PATH at the folder."
            )
        wanted = [i for i in infos if _wanted(i.filename, only)]
        if only and not any(not i.is_dir() for i in wanted):
            raise SourceError(
                f"{archive} holds none of the files {sorted(only)} at its top or one folder down "
                f"(members: {[i.filename for i in infos[:10]]}); give the MovieLens archive as downloaded."
            )
        encrypted = [i.filename for i in wanted if i.flag_bits & 0x1]
        if encrypted:
            raise SourceError(
                f"{archive}: member {encrypted[0]!r} is encrypted (password-protected); nothing was "
                "unpacked. Decrypt it first: unpack the archive with its password and point "
                "RECSYS_DATA_PATH at the folder."
            )
        odd = [i.filename for i in wanted if i.compress_type not in _ZIP_METHODS]
        if odd:
            raise SourceError(
                f"{archive}: {odd[:3]} use a compression method Python's zipfile cannot read "
                "(e.g. Deflate64); unpack it with another tool and point RECSYS_DATA_PATH at the folder."
            )
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise SourceError(
                f"{archive} ({human_bytes(archive.stat().st_size)}) would unpack to "
                f"{human_bytes(declared)} in {len(infos)} files, over {limit}; nothing was unpacked. {fix}"
            )
        written = 0
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for info in wanted:
                member = info.filename
                target = (dest / info.filename).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise SourceError(f"{archive}: member {info.filename!r} escapes the archive root.")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise SourceError(
                                f"{archive} unpacks past {limit} although its header says "
                                f"{human_bytes(declared)}; refusing it as corrupt or hostile. {fix}"
                            )
                        out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise SourceError(
                f"{archive} is corrupt or truncated: member {member!r} cannot be unpacked "
                f"({short_error(exc)}); re-download or re-copy the archive."
            ) from exc
        except OSError as exc:
            if is_storage_failure(exc):
                raise storage_error(exc, dest, kept="The archive itself is unchanged.") from exc
            raise SourceError(
                f"{archive}: member {member!r} cannot be unpacked into {dest} ({exc})."
            ) from exc
    return dest


# ---------------------------------------------------------------- text file checks


def _open_text_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _binary_error(path: Path, encoding: str, head: bytes) -> SourceError | None:
    """A :class:`SourceError` when ``head`` (a file's first bytes) holds a NUL byte."""
    if b"\0" not in head:
        return None
    offset = head.index(b"\0")
    line = head[:offset].count(b"\n") + 1
    return SourceError(
        f"{path} is a binary file, not {encoding} text (a NUL byte at offset {offset}, line "
        f"{line}). Replace it with the text table it should be "
        "(binary tables must be .parquet files)."
    )


def check_text_file(
    path: Path, max_line_bytes: int, encoding: str = "utf-8", max_unpack_bytes: int = MAX_UNPACKED_BYTES
) -> None:
    """Refuse a text input DuckDB should not be handed, before it reads it: a line longer
    than ``max_line_bytes`` (DuckDB would hold it whole in memory; such a file is corrupt or
    lost its line breaks), NUL bytes in the first 64 KiB (a binary file, not text), a
    carriage return that does not end a line (binary data or old Mac line endings; DuckDB's
    parser stops on it with no line number), a truncated/corrupt ``.gz``, or a ``.gz`` that
    unpacks past ``max_unpack_bytes`` (a gzip bomb: its rows would all be read and stored).
    One pass with numpy over 16 MiB blocks (about 1 s per GB), memory bounded by the block
    size whatever the line lengths.

    Raises:
        SourceError: naming the file, the line and what to do.
    """
    line_no, current = 1, 0  # current: bytes so far in the unfinished line ``line_no``
    cr_pending = False  # the previous block ended with '\r'

    def too_long(n: int, length: int) -> SourceError:
        return SourceError(
            f"{path}: line {n} is longer than {human_bytes(max_line_bytes)} (at least "
            f"{human_bytes(length)}; RECSYS_MAX_LINE_BYTES={max_line_bytes}). No row of this "
            "data is that long: the file is corrupt, lost its line breaks (old Mac '\\r' line "
            "endings?) or is not a text table. Fix or replace the file, or raise "
            "RECSYS_MAX_LINE_BYTES if such lines are real."
        )

    def lone_cr(n: int) -> SourceError:
        return SourceError(
            f"{path}: line {n} holds a carriage return ('\\r') that does not end the line: binary "
            "data, or old Mac line endings. Convert the file to '\\n' (or '\\r\\n') line endings, "
            "or replace it."
        )

    gz, unpacked = path.name.lower().endswith(".gz"), 0
    try:
        with _open_text_bytes(path) as fh:
            first = True
            while chunk := fh.read(1 << 24):
                unpacked += len(chunk)
                if gz and unpacked > max_unpack_bytes:
                    raise SourceError(
                        f"{path} unpacks past the limit of {human_bytes(max_unpack_bytes)} "
                        f"(RECSYS_MAX_UNPACK_BYTES={max_unpack_bytes}) from "
                        f"{human_bytes(path.stat().st_size)}; refusing it before reading a row. If the "
                        "file is trusted, raise RECSYS_MAX_UNPACK_BYTES, or unpack it yourself (gunzip) "
                        "and give the .csv."
                    )
                if first and (binary := _binary_error(path, encoding, chunk[:65536])) is not None:
                    raise binary
                first = False
                arr = np.frombuffer(chunk, np.uint8)
                newlines = np.flatnonzero(arr == 10)
                returns = np.flatnonzero(arr == 13)
                if cr_pending and arr[0] != 10:
                    raise lone_cr(line_no)
                if returns.size:
                    follows = returns + 1
                    inside = follows < arr.size
                    lone = returns[inside][arr[follows[inside]] != 10]
                    if lone.size:
                        raise lone_cr(line_no + int(np.searchsorted(newlines, lone[0])))
                cr_pending = bool(returns.size) and int(returns[-1]) == arr.size - 1
                if newlines.size == 0:
                    current += len(chunk)
                else:
                    if current + newlines[0] > max_line_bytes:
                        raise too_long(line_no, current + int(newlines[0]))
                    inner = np.diff(newlines) - 1
                    over = np.flatnonzero(inner > max_line_bytes)
                    if over.size:
                        raise too_long(line_no + 1 + int(over[0]), int(inner[over[0]]))
                    line_no += newlines.size
                    current = len(chunk) - int(newlines[-1]) - 1
                if current > max_line_bytes:
                    raise too_long(line_no, current)
            if cr_pending:
                raise lone_cr(line_no)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise SourceError(
            f"{path} is truncated or corrupt ({short_error(exc)}); re-copy or re-download it."
        ) from exc
    except OSError as exc:
        raise SourceError(f"{path} cannot be read ({exc}).") from exc


def check_parquet_file(path: Path, max_unpack_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Refuse a parquet file whose column data, once decompressed, is over ``max_unpack_bytes``:
    the footer's uncompressed size of every row group, read without the data. This is the
    codec's compression (zstd, gzip, snappy), the analogue of a zip or ``.gz`` bomb; what
    parquet's encodings (dictionary, run lengths) expand on decoding is not counted, but each
    row is one staged row and DuckDB spills those to disk.

    Raises:
        SourceError: naming the file, both sizes and the setting.
    """
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(
            f"{path} cannot be read as parquet ({short_error(exc)}); re-export it."
        ) from exc
    unpacked = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if unpacked > max_unpack_bytes:
        raise SourceError(
            f"{path} unpacks to {human_bytes(unpacked)} of column data (footer) from "
            f"{human_bytes(path.stat().st_size)}, over the limit of {human_bytes(max_unpack_bytes)} "
            f"(RECSYS_MAX_UNPACK_BYTES={max_unpack_bytes}); nothing was read. If the file is "
            "trusted, raise RECSYS_MAX_UNPACK_BYTES, or split it into smaller files."
        )


_DELIM_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


def read_header(path: Path, delim: str, encoding: str, max_line_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """The column names in the first line of a csv/tsv file, read without sniffing (a
    damaged row further down must not hide the header).

    Raises:
        SourceError: empty file, binary data, undecodable or over-long header, duplicate names.
    """
    try:
        with _open_text_bytes(path) as fh:
            head = fh.read(65536)
            fh.seek(0)
            raw = fh.readline(max_line_bytes + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise SourceError(f"{path} cannot be read ({short_error(exc)}); re-copy or re-download it.") from exc
    if (binary := _binary_error(path, encoding, head)) is not None:
        raise binary
    if not raw.strip():
        raise SourceError(f"{path} is empty or its first line is blank: expected a header of column names.")
    if len(raw) > max_line_bytes:
        raise SourceError(
            f"{path}: the header line is longer than {human_bytes(max_line_bytes)} "
            f"(RECSYS_MAX_LINE_BYTES={max_line_bytes}); the file is corrupt or not a csv/tsv table."
        )
    try:
        text = raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{path}: the header is not valid {encoding} ({exc.reason} at byte {exc.start}); "
            "re-encode the file as UTF-8, or set RECSYS_FILES_ENCODING=latin-1 for Latin-1 files."
        ) from None
    names = next(csv.reader([text.rstrip("\r\n")], delimiter=delim))
    names = [n.strip() for n in names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SourceError(f"{path}: the header names {dupes} more than once; give each column one name.")
    return names


def delimiter_hint(path: Path, delim: str, columns: list[str]) -> str:
    """When a header read with ``delim`` gives one column that holds another separator,
    say so: a ';' file read as ',' (or a tab-separated file named .csv) is the usual cause."""
    if len(columns) != 1:
        return ""
    counts = {d: columns[0].count(d) for d in _DELIM_NAMES if d != delim}
    best = max(counts, key=counts.get)
    if not counts[best]:
        return ""
    fix = {
        "\t": "name it .tsv (tab-separated) or convert it to comma-separated .csv",
        ",": "name it .csv",
    }.get(best, "convert it to comma-separated .csv (or tab-separated .tsv)")
    return (
        f"{path} looks {_DELIM_NAMES[best]}-separated, but {path.suffix or 'this'} files are read as "
        f"{_DELIM_NAMES.get(delim, repr(delim))}-separated: its header {columns[0]!r} is one column. "
        f"{fix[0].upper() + fix[1:]}. "
    )
