"""predict's rows, as JSON lines or CSV (by the file's suffix): nothing lost when a long run dies.

Rows go to ``<out>.partial`` as they finish (flushed each row, fsynced every few) and the file is renamed to
``<out>`` at the end. After a kill, ``--resume`` keeps the rows whose input is unchanged (same path, size and
modification time) and were written with the same settings (the ``run`` column: model, mode, threshold, image
size...), so each input ends up exactly once; an interrupted run (SIGINT, SIGTERM) keeps its partial file for that.
Rows of other settings are refused with what differs, never mixed in. Lines that cannot be read (cut short by a
kill, not UTF-8) are skipped.

CSV cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage return) are written
behind a ``'``, as OWASP advises; reading them back for ``--resume`` takes it off again.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Optional, Tuple

from .errors import VisualADError
from .result import ROW_COLUMNS

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
FSYNC_EVERY = 64  # rows

Key = Tuple[str, int, int]
#: the CSV columns: the JSONL fields, lists and objects as JSON text; then what --resume keys on
CSV_COLUMNS = ROW_COLUMNS + ("file_size", "file_mtime_ns", "run")
#: the first characters that make a spreadsheet cell a formula; ``'`` itself so that escaping can be undone
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return str(value)


def _uncell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def _run_of(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    run = row.get("run")
    if isinstance(run, str):
        try:
            run = json.loads(run)
        except json.JSONDecodeError:
            return None
    return run if isinstance(run, dict) else None


def input_key(path: Path) -> Optional[Key]:
    """(absolute path, size, mtime in ns) of an input file; None when it cannot be read (an error row)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)


def _row_key(row: Dict[str, Any]) -> Optional[Key]:
    try:
        return os.path.abspath(row["path"]), int(row["file_size"]), int(row["file_mtime_ns"])
    except (KeyError, TypeError, ValueError):
        return None


class RowWriter:
    """Streams rows to ``<out>.partial``; :meth:`commit` renames it to ``out``. With ``resume``, rows of an
    earlier run of the same inputs (from ``out`` or its partial file) are kept and their inputs skipped.

    The partial file is opened with the first row: a run that stops before any (a model that does not load, a
    device that is not there) leaves an earlier run's files as they were, and asks for no ``--resume``."""

    def __init__(self, out: Path, resume: bool = False, inputs: Iterable[Optional[Key]] = (),
                 run: Optional[Dict[str, Any]] = None) -> None:
        """``run``: the settings that change a row; every row carries them and ``resume`` keeps only rows of the
        same (anything else is an error that says what differs)."""
        self.out = Path(out)
        self.run = run
        self.csv = self.out.suffix.lower() == ".csv"
        self.parquet = _Parquet() if self.out.suffix.lower() == ".parquet" else None
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        wanted = set(inputs)
        self.kept: Dict[Key, Dict[str, Any]] = {
            k: row for k, row in self._earlier_rows().items() if k in wanted} if resume else {}
        if self.out.is_dir():
            raise VisualADError("--out is a folder; name a file for the rows", self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.out.parent, os.W_OK):  # said before the model loads, not at the first row
            raise VisualADError("cannot write the rows there: the folder is not writable", self.out.parent)
        self._fh: Optional[IO[Any]] = None
        self._csv: Optional[csv.DictWriter] = None
        self._unsynced = 0

    def _open(self) -> None:
        """Start the partial file (replacing an earlier one, whose kept rows are in memory): the kept rows
        first, so that a second kill loses them neither."""
        self._fh = (open(self.partial, "wb") if self.parquet is not None  # noqa: SIM115
                    else open(self.partial, "w", encoding="utf-8", newline=""))
        self._csv = csv.DictWriter(self._fh, fieldnames=CSV_COLUMNS, extrasaction="ignore") if self.csv else None
        if self._csv is not None:
            self._csv.writeheader()
        for row in self.kept.values():
            self._put(row)

    def _earlier_rows(self) -> Dict[Key, Dict[str, Any]]:
        rows: Dict[Key, Dict[str, Any]] = {}
        for path in (self.out, self.partial):
            if not path.is_file():
                continue
            for row in self._read(path):
                key = _row_key(row)
                if key is not None and not row.get("error") and input_key(Path(row["path"])) == key:
                    self._same_run(row, path)
                    rows[key] = row
        return rows

    def _same_run(self, row: Dict[str, Any], path: Path) -> None:
        """A kept row must come from a run of the same settings."""
        if self.run is None:
            return
        earlier = _run_of(row)
        if earlier is None:
            raise VisualADError("--resume: its rows do not record their settings (an older visualad); run again "
                                "without --resume", path)
        diff = [f"{k} {earlier.get(k)!r} then, {self.run.get(k)!r} now" for k in sorted(set(earlier) | set(self.run))
                if earlier.get(k) != self.run.get(k)]
        if diff:
            raise VisualADError("--resume: these rows were written with other settings (" + "; ".join(diff)
                                + "); run with the same settings, or without --resume to start over", path)

    def _read(self, path: Path) -> Iterable[Dict[str, Any]]:
        if self.parquet is not None:
            yield from self.parquet.read(path)
            return
        # bytes that are not UTF-8 become U+FFFD: such a row names no input and is dropped like a cut-short one
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            if self.csv:
                yield from _csv_rows(fh)
                return
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                if isinstance(row, dict):
                    yield row

    def done(self, key: Optional[Key]) -> bool:
        return key is not None and key in self.kept

    def write(self, row: Dict[str, Any]) -> None:
        if self._fh is None:
            self._open()
        self._put(row)

    def _put(self, row: Dict[str, Any]) -> None:
        assert self._fh is not None
        if self.run is not None:
            row["run"] = self.run
        if self.parquet is not None:
            self.parquet.add(row, self._fh)
            return
        if self._csv is not None:
            self._csv.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
        else:
            self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            os.fsync(self._fh.fileno())
            self._unsynced = 0

    def commit(self) -> None:
        """Everything is written: fsync and rename the partial file to ``out``."""
        if self._fh is None:  # no new row: the kept ones, or none
            self._open()
        assert self._fh is not None
        if self.parquet is not None:
            self.parquet.close(self._fh)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self.partial, self.out)

    def abandon(self) -> None:
        """The run stopped early: close the partial file and keep it for ``--resume`` (if it was started)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            logger.warning("rows so far are in %s; run the same command with --resume to finish", self.partial)


def _csv_rows(fh: IO[str]) -> Iterable[Dict[str, Any]]:
    """The complete rows of a CSV file; a line the csv module refuses (a NUL byte...) is skipped."""
    reader = csv.DictReader(fh)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            continue
        if row.get("file_mtime_ns"):  # not a cut-short line
            yield {k: _uncell(v) if isinstance(v, str) else v for k, v in row.items()}


class _Parquet:
    """Parquet rows (the CSV columns, typed; lists as JSON text), written a row group at a time. A killed run
    leaves a partial file without its footer: ``--resume`` then keeps the rows of a finished ``out`` only."""

    GROUP = 1024

    def __init__(self) -> None:
        import pyarrow as pa

        self.pa = pa
        text, num, whole = pa.string(), pa.float64(), pa.int64()
        types = {"label": pa.bool_(), "score": num, "normalized_score": num, "threshold": num, "height": whole,
                 "width": whole, "file_size": whole, "file_mtime_ns": whole}
        self.schema = pa.schema([(c, types.get(c, text)) for c in CSV_COLUMNS])
        self.rows: list = []
        self.writer: Any = None

    def add(self, row: Dict[str, Any], fh: IO[Any]) -> None:
        self.rows.append({c: json.dumps(row.get(c)) if isinstance(row.get(c), (list, dict)) else row.get(c)
                          for c in CSV_COLUMNS})
        if len(self.rows) >= self.GROUP:
            self._flush(fh)

    def _flush(self, fh: IO[Any]) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(fh, self.schema)
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self, fh: IO[Any]) -> None:
        self._flush(fh)
        self.writer.close()

    def read(self, path: Path) -> Iterable[Dict[str, Any]]:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception:  # noqa: BLE001 - a partial file of a killed run has no footer
            return
        yield from table.to_pylist()
