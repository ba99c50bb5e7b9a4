"""Text to arrays: the vectorised FER pixel parser and the CSV column reader.

FER pixel strings are parsed with a vectorised byte-level parser (`parse_pixel_rows`)
instead of the usual per-row `np.array(row.split())`: 35,887 x 2,304 pixels at about 3.6
bytes of text each make that loop the slowest part of every FER script
(`benchmarks/data_decode.py` measures both).
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from fer.data.types import FER_USAGE, DataError

CHUNK_ROWS = 256  # rows per parser chunk: ~2.3 MB of pixel text stays in the CPU cache

_PAD = b"    "  # lets the parser look three bytes back from the first separator


class _Workspace(threading.local):
    """Per-thread scratch arrays reused from chunk to chunk: fresh multi-megabyte temporaries
    cost a page fault every 4 KB, which here is more than all the arithmetic on them."""

    size = 0

    def reserve(self, nbytes: int) -> "_Workspace":
        if nbytes > self.size:
            self.size = n = nbytes + nbytes // 4 + 64
            self.blob = bytearray(n)
            self.mask = np.empty(n, bool)
            self.digits = np.empty((3, n), np.uint8)  # at most one token per byte
            self.flags = np.empty((2, n), bool)
        return self


_WORKSPACE = _Workspace()


def _parse_chunk(rows: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse pixel strings (bytes-like, digits separated by spaces) into uint8 values.

    Returns (per-row counts, values) -- values live in this thread's workspace until its next
    call -- or None when anything is unusual (a byte other than a digit or a space, an
    over-long token, a value above 255): the caller then re-parses the chunk slowly to name
    the offending row. Only the separators are located; the three bytes before each
    separator are the token's ones, tens and hundreds digits.
    """
    ws = _WORKSPACE.reserve(sum(len(r) for r in rows) + len(rows) + len(_PAD))
    blob = _join_rows(ws, rows)
    a = blob[3:]  # a[0] is the space before row 0
    if a.max() > 57:
        return None  # a letter or other byte above '9'
    mask = ws.mask[:len(a)]
    np.equal(a, 32, out=mask)
    sep = mask.nonzero()[0]
    ends = sep[1:]  # each space closes the token before it
    m = len(ends)
    d1, d2, d3 = ws.digits[0, :m], ws.digits[1, :m], ws.digits[2, :m]
    blob[2:].take(ends, out=d1, mode="clip")  # last digit ("clip": no bounds-check buffering)
    blob[1:].take(ends, out=d2, mode="clip")  # tens, if a digit
    blob.take(ends, out=d3, mode="clip")  # hundreds, if a digit
    row_ends = np.cumsum(np.fromiter((len(r) + 1 for r in rows), np.int64, len(rows)))
    last = np.searchsorted(ends, row_ends)  # index in `ends` of each row's final space
    if d1.min() >= 48:
        counts = np.diff(last, prepend=-1)
    else:  # empty tokens: runs of spaces, or leading/trailing spaces -- drop them
        keep = d1 >= 48
        d1, d2, d3 = d1[keep], d2[keep], d3[keep]
        counts = np.diff(np.cumsum(keep)[last], prepend=0)
    values = _digits_to_values(ws, d1, d2, d3, len(a) - len(sep))
    return None if values is None else (counts, values)


def _join_rows(ws: _Workspace, rows: list) -> np.ndarray:
    """The rows, each followed by a space, after `_PAD`, in the workspace's reused buffer."""
    buf, view = ws.blob, memoryview(ws.blob)
    view[:4] = _PAD
    p = 4
    for row in rows:  # one copy into a reused buffer (b" ".join would allocate fresh pages)
        n = len(row)
        view[p:p + n] = row
        p += n
        buf[p] = 32  # rows end with a space too; their ends are known by position
        p += 1
    return np.frombuffer(buf, np.uint8, count=p)


def _digits_to_values(ws: _Workspace, d1: np.ndarray, d2: np.ndarray, d3: np.ndarray,
                      digits: int) -> np.ndarray | None:
    """Each token's ones, tens and hundreds bytes -> its uint8 value (in place, in d1); None
    when the tokens do not account for all `digits` non-space bytes or a value exceeds 255."""
    m = len(d1)
    has2, has3 = ws.flags[0, :m], ws.flags[1, :m]
    np.greater_equal(d2, 48, out=has2)
    np.greater_equal(d3, 48, out=has3)
    has3 &= has2
    if m + np.count_nonzero(has2) + np.count_nonzero(has3) != digits:
        return None  # a token of four or more bytes, or a byte below '0' other than a space (sign)
    d1 -= 48
    d2 -= 48
    d2 *= has2
    d2 *= 10
    d1 += d2  # ones and tens, 0..99
    d3 -= 48
    d3 *= has3  # hundreds digit
    top = d3.max()
    if top > 2:
        return None  # a value above 299
    if top == 2:
        np.equal(d3, 2, out=has2)
        np.greater(d1, 55, out=has3)
        has2 &= has3
        if has2.any():
            return None  # a value in 256..299
    d3 *= 100
    d1 += d3
    return d1


def _parse_row_slow(row: str, where: str) -> np.ndarray:
    """Parse one pixel string with full checks; raise DataError naming `where`."""
    values = []
    for token in row.replace('"', " ").split():  # a quoted field in an unquoted file
        if "," in token:
            raise DataError(f"{where}: too many comma-separated fields (a comma inside the pixels "
                            f"field: {token[:24]!r})")
        if not token.isdigit() or not token.isascii():
            raise DataError(f"{where}: non-numeric pixel value {token[:20]!r} "
                            f"(expected integers 0..255 separated by spaces)")
        value = int(token)
        if value > 255:
            raise DataError(f"{where}: pixel value {value} outside 0..255")
        values.append(value)
    return np.array(values, np.uint8)


def _parse_chunk_slow(rows: list, path: str | os.PathLike, lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    per_row = [_parse_row_slow(bytes(r).decode("latin-1"), f"{path}: line {line}")
               for r, line in zip(rows, lines)]
    return np.array([len(v) for v in per_row]), np.concatenate(per_row)


def _expected_count(counts: np.ndarray, path: str | os.PathLike, lines: np.ndarray) -> int:
    """The square pixel count most rows agree on (2304 = 48x48 for FER2013)."""
    seen, freq = np.unique(counts, return_counts=True)
    square = (seen > 0) & (np.round(np.sqrt(seen)) ** 2 == seen)
    if not square.any():
        raise DataError(f"{path}: line {lines[0]}: found {counts[0]} pixel values; expected a square "
                        f"image's worth (e.g. 2304 = 48x48), the same in every row")
    return int(seen[square][freq[square].argmax()])


def parse_pixel_rows(rows: list, path: str | os.PathLike, lines: np.ndarray,
                     workers: int | None = None) -> np.ndarray:
    """Parse FER pixel strings into a uint8 array (N, S, S, 1).

    rows: bytes-like pixel strings; lines: the 1-based file line of each row (for errors).
    Every row must hold the same square number of values, the one most of the first rows hold.
    """
    if not rows:
        return np.zeros((0, 0, 0, 1), np.uint8)
    size = CHUNK_ROWS
    starts = range(0, len(rows), size)
    first = _parse_chunk(rows[:size]) or _parse_chunk_slow(rows[:size], path, lines[:size])
    expected = _expected_count(first[0], path, lines[:size])
    out = np.empty(len(rows) * expected, np.uint8)

    def fill(start: int) -> bool:
        chunk = rows[start:start + size]
        parsed = _parse_chunk(chunk)
        if parsed is None or not (parsed[0] == expected).all():
            return False
        out[start * expected:(start + len(chunk)) * expected] = parsed[1]
        return True

    workers = workers or min(4, os.cpu_count() or 1)
    # numpy releases the GIL in the heavy calls, so threads overlap chunks on several cores
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(fill, starts))
    else:
        done = [fill(start) for start in starts]
    for start, ok in zip(starts, done):  # in file order, so the first bad row is named
        if ok:
            continue
        # something unusual in this chunk: parse it row by row, raising for the offending row
        where = lines[start:start + size]
        counts, values = _parse_chunk_slow(rows[start:start + size], path, where)
        bad = np.flatnonzero(counts != expected)
        if len(bad):
            side = int(round(expected ** 0.5))
            raise DataError(f"{path}: line {where[bad[0]]}: expected {expected} pixel values "
                            f"({side}x{side}, like the other rows), found {counts[bad[0]]}")
        out[start * expected:start * expected + len(values)] = values
    side = int(round(expected ** 0.5))
    return out.reshape(len(rows), side, side, 1)


def read_text_bytes(path: Path):
    """The file's bytes: a read-only memory map, or a cleaned copy when it has a UTF-8 BOM, CRLF
    line ends or quoted fields (quotes removed: FER fields never hold commas, so they carry
    nothing). This is judged on the first two lines, as writers keep it uniform; a stray CR
    or quoted field further on still parses, on the slower path."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DataError(f"{path}: empty file (expected a header line, then one row a line)")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e}") from e
    second_end = data.find(b"\n", data.find(b"\n") + 1)
    head = data[:second_end if second_end > 0 else len(data)]
    if head.startswith(b"\xef\xbb\xbf") or b"\r" in head or b'"' in head:
        text = data[:]
        data.close()
        return text.removeprefix(b"\xef\xbb\xbf").replace(b"\r", b"").replace(b'"', b"")
    return data


def read_csv_columns(path: Path, required: list[str], optional: Iterable[str] = ()
                     ) -> tuple[dict[str, list], np.ndarray]:
    """Read a comma-separated file into {column: list of raw field bytes} + 1-based line numbers.

    The `pixels` column comes back as zero-copy memoryviews. A hand loop over `find`/`rfind`
    (memchr speed; the long pixels field is scanned once, for the newline) is faster here than
    pandas, whose C tokenizer copies 300 MB of pixel text into Python strings.
    """
    data = read_text_bytes(path)
    head_end = data.find(b"\n")
    head_end = len(data) if head_end < 0 else head_end
    names = [c.strip() for c in data[:head_end].decode("utf-8", "replace").split(",")]
    for column in required:
        if column not in names:
            raise DataError(f"{path}: line 1: missing required column {column!r}; found columns "
                            f"{','.join(names)}, expected {','.join(list(required) + list(optional))}")
    wanted = list(required) + [c for c in optional if c in names]
    # The pixels field is found by commas counted from the line start (fields left of it) and
    # from the line end (fields right of it); memchr then checks it holds no further comma.
    left = names.index("pixels") if "pixels" in names else len(names) - 1
    bounds = _row_bounds(data, path, names, head_end + 1, left)
    return _slice_columns(data, names, wanted, left, bounds), np.array(bounds[4], np.int64)


def _row_bounds(data, path: Path, names: list[str], pos: int, left: int) -> tuple[list[int], ...]:
    """Per data row: (line start, pixels start, pixels stop, line end, line number); blank
    lines skipped, a row with the wrong number of fields a DataError naming its line."""
    ncols, n = len(names), len(data)
    right = ncols - 1 - left
    firsts, starts, stops, lasts, lines = [], [], [], [], []
    find, rfind = data.find, data.rfind
    lineno = 1
    while pos < n:
        lineno += 1
        end = find(b"\n", pos)
        if end < 0:
            end = n
        if end - pos < 8 and not data[pos:end].strip():  # blank line
            pos = end + 1
            continue
        start = pos
        for _ in range(left):
            start = find(b",", start, end) + 1
            if start == 0:
                break
        stop = end
        for _ in range(right):
            stop = rfind(b",", start, stop)
            if stop < 0:
                break
        if start == 0 or stop < 0 or find(b",", start, stop) >= 0:
            found = data[pos:end].count(b",") + 1
            raise DataError(f"{path}: line {lineno}: expected {ncols} comma-separated fields "
                            f"({','.join(names)}), found {found}")
        firsts.append(pos)
        starts.append(start)
        stops.append(stop)
        lasts.append(end)
        lines.append(lineno)
        pos = end + 1
    return firsts, starts, stops, lasts, lines


def _slice_columns(data, names: list[str], wanted: list[str], left: int,
                   bounds: tuple[list[int], ...]) -> dict[str, list]:
    """Raw field bytes of the wanted columns, unstripped: the label and Usage parsers strip."""
    firsts, starts, stops, lasts, _ = bounds
    right = len(names) - 1 - left
    view = memoryview(data)
    columns: dict[str, list] = {}
    for name in wanted:
        k = names.index(name)
        if name == "pixels":
            columns[name] = [view[a:b] for a, b in zip(starts, stops)]
        elif k < left:  # "3," -> b"3"
            heads = [data[a:b - 1] for a, b in zip(firsts, starts)]
            columns[name] = heads if left == 1 else [h.split(b",")[k] for h in heads]
        else:  # ",Training" -> b"Training"
            tails = [data[a + 1:b] for a, b in zip(stops, lasts)]
            columns[name] = tails if right == 1 else [t.split(b",")[k - left - 1] for t in tails]
    return columns


def parse_labels(values: list[bytes], path: Path, lines: np.ndarray, num_classes: int,
                 allow_empty: bool = False) -> np.ndarray:
    """Integer labels in 0..num_classes-1; empty fields become -1 when `allow_empty`."""
    text = np.char.strip(np.array(values, dtype=bytes), b' \t"') if values else np.zeros(0, "S1")
    empty = text == b""
    try:  # numpy parses the byte strings in C; any oddity falls through to the named checks
        labels = np.where(empty, b"-1", text).astype(np.int64)
        if (labels[~empty] >= 0).all() and (labels < num_classes).all() and (allow_empty or not empty.any()):
            return labels
    except (ValueError, OverflowError):
        pass
    labels = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        v = v.strip(b' \t"')
        if not v:
            if not allow_empty:
                raise DataError(f"{path}: line {lines[i]}: empty label (expected an integer "
                                f"0..{num_classes - 1})")
            labels[i] = -1
            continue
        try:
            labels[i] = int(v)
        except ValueError:
            raise DataError(f"{path}: line {lines[i]}: label {v.decode('utf-8', 'replace')!r} is not "
                            f"an integer (expected 0..{num_classes - 1})") from None
        if not 0 <= labels[i] < num_classes:
            raise DataError(f"{path}: line {lines[i]}: label {labels[i]} outside the class range "
                            f"0..{num_classes - 1}")
    return labels


def split_codes(usage: list[bytes], path: Path, lines: np.ndarray) -> np.ndarray:
    """Usage strings -> index into FER_USAGE's splits (train, val, test, unlabeled)."""
    text = np.array(usage, dtype=bytes) if usage else np.zeros(0, "S1")
    seen, inverse = np.unique(text, return_inverse=True)
    codes = np.empty(len(seen), np.int64)
    for j, value in enumerate(seen):
        name = value.decode("utf-8", "replace").strip(' \t"')
        if name not in FER_USAGE:
            line = lines[np.flatnonzero(inverse == j)[0]]
            raise DataError(f"{path}: line {line}: unknown Usage {name!r} "
                            f"(expected one of {', '.join(FER_USAGE)})")
        codes[j] = list(FER_USAGE).index(name)
    return codes[inverse.ravel()]
