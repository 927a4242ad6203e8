"""Prompt files: plain text (one prompt a line), CSV / TSV with a header, or JSONL (one object a line).

A row is a mapping of column name to value. The known columns are typed here (see :data:`COLUMNS`) so a
mistake such as ``steps=forty`` is reported with its file and line before anything is queued; any other
column is kept as written and needs ``--map COLUMN=NodeTitle.input`` to say where it goes. Empty cells
(and JSON ``null``) mean "use the workflow's value".
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..prompt_lines import split_prompt_lines
from .errors import PromptsFileError

# Column -> kind. "path" values are local image files, resolved against the prompts file's folder.
COLUMNS: dict[str, str] = {
    "prompt": "str",
    "negative": "str",
    "seed": "int",
    "steps": "int",
    "cfg": "float",
    "width": "int",
    "height": "int",
    "denoise": "float",
    "control_image": "path",
    "init_image": "path",
    "mask_image": "path",
    "ip_image": "path",
    "ip_scale": "float",
    "apg_eta": "float",
    "apg_norm_threshold": "float",
    "apg_momentum": "float",
}
PATH_COLUMNS = frozenset(c for c, kind in COLUMNS.items() if kind == "path")
FORMATS = ("txt", "csv", "tsv", "jsonl")
MAX_SEED = 2**64 - 1  # ComfyUI's seed widgets stop here


@dataclass(frozen=True)
class Row:
    """One row of the prompts file: ``index`` counts rows from 0, ``line`` is where it starts in the file."""

    index: int
    line: int
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Job:
    """One image request: a row with one of its seeds (``k`` counts the row's seeds from 0)."""

    row: Row
    k: int
    seed: int | None
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable identity of the job across runs (the manifest and resume use it)."""
        return f"{self.row.index}:{self.k}"

    @property
    def stem(self) -> str:
        """Start of the output file names: ``<row:05d>_<seed>`` (``<row>_<k>`` when the seed is not set)."""
        return f"{self.row.index:05d}_{self.seed if self.seed is not None else self.k}"


def normalize_column(name: str) -> str:
    """Column names are matched without case, surrounding blanks, or the difference between - and _."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def detect_format(path: str) -> str:
    """``txt``, ``csv``, ``tsv`` or ``jsonl`` from the file name (anything unknown is plain text)."""
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(ext, "txt")


def convert_value(column: str, value: Any, where: str, base_dir: str) -> Any:
    """The typed value of a known column (unknown columns come back as given); ``None`` for "not set"."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
    kind = COLUMNS.get(column)
    if kind is None:
        return value
    try:
        if kind == "str":
            if isinstance(value, (dict, list)):
                raise ValueError("expected text")
            return str(value)
        if kind == "int":
            return _to_int(value, column)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number such as 4.5, got {value!r}") from None
        if kind == "path":
            if not isinstance(value, str):
                raise ValueError("expected a file path")
            path = os.path.expanduser(value.strip())
            path = os.path.normpath(os.path.join(base_dir, path))
            if not os.path.isfile(path):
                raise ValueError(f"{value!r} is not a file (looked for {path})")
            return path
    except (TypeError, ValueError) as e:
        raise PromptsFileError(f"{where}: column {column!r}: {e}") from None
    raise AssertionError(kind)  # pragma: no cover - COLUMNS only holds the kinds above


def _to_int(value: Any, column: str) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value}")
        value = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                f = float(text)  # "40.0" is fine
            except ValueError:
                raise ValueError(f"expected a whole number such as 30, got {text!r}") from None
            if not f.is_integer():
                raise ValueError(f"expected a whole number, got {text!r}") from None
            value = int(f)
    elif not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {type(value).__name__}")
    if column == "seed" and not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed {value} is outside 0..{MAX_SEED}")
    return value


def _row(index: int, line: int, raw: Mapping[str, Any], where: str, base_dir: str) -> Row:
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name is None:  # csv puts surplus cells under None
            raise PromptsFileError(f"{where}: more cells than header columns")
        column = normalize_column(str(name))
        if not column:
            continue
        v = convert_value(column, value, where, base_dir)
        if v is not None:
            values[column] = v
    return Row(index, line, values)


def parse_text(lines: Iterable[str], name: str, base_dir: str = ".") -> list[Row]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped (``sd35_cli.prompt_lines``)."""
    return [Row(i, number, {"prompt": text}) for i, (number, text) in enumerate(split_prompt_lines(lines).prompts)]


def parse_csv(text: str, name: str, base_dir: str = ".", delimiter: str = ",") -> list[Row]:
    """A header row, then one row per prompt; empty cells leave the workflow's value alone."""
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    if not reader.fieldnames:
        raise PromptsFileError(f"{name}: empty file (expected a header row such as 'prompt,seed')")
    columns = [normalize_column(c) for c in reader.fieldnames]
    dup = sorted({c for c in columns if c and columns.count(c) > 1})
    if dup:
        raise PromptsFileError(f"{name}: column {dup[0]!r} appears more than once in the header")
    rows = []
    for record in reader:
        line = reader.line_num
        if None not in record and not any(str(v).strip() for v in record.values() if v is not None):
            continue
        rows.append(_row(len(rows), line, record, f"{name} line {line} (row {len(rows) + 1})", base_dir))
    return rows


def parse_jsonl(lines: Iterable[str], name: str, base_dir: str = ".") -> list[Row]:
    """One JSON object a line (or a bare JSON string, taken as the prompt); blank lines are skipped."""
    rows = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{name} line {number} (row {len(rows) + 1})"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptsFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise PromptsFileError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}, "
                                   f"got {type(obj).__name__}")
        rows.append(_row(len(rows), number, obj, where, base_dir))
    return rows


def read_prompts(path: str, fmt: str | None = None) -> list[Row]:
    """Read a prompts file; ``fmt`` (``txt``, ``csv``, ``tsv``, ``jsonl``) defaults to the file extension."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise PromptsFileError(f"prompts format {fmt!r}: expected one of {', '.join(FORMATS)}")
    name = os.path.basename(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise PromptsFileError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise PromptsFileError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if fmt == "txt":
        rows = parse_text(text.splitlines(), name, base_dir)
    elif fmt == "jsonl":
        rows = parse_jsonl(text.splitlines(), name, base_dir)
    else:
        rows = parse_csv(text, name, base_dir, delimiter="\t" if fmt == "tsv" else ",")
    if not rows:
        raise PromptsFileError(f"{name}: no prompts in the file")
    return rows


def parse_overrides(items: Sequence[str], base_dir: str = ".") -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as typed values, checked like a prompts-file cell of that column."""
    values: dict[str, Any] = {}
    for item in items:
        field_name, sep, value = item.partition("=")
        column = normalize_column(field_name)
        if not sep or not column:
            raise PromptsFileError(f"--set {item!r}: expected FIELD=VALUE, such as --set steps=30")
        if not value.strip():
            raise PromptsFileError(f"--set {item!r}: no value after '='")
        values[column] = convert_value(column, value, f"--set {item}", base_dir)
    return values


def with_overrides(rows: Sequence[Row], overrides: Mapping[str, Any]) -> list[Row]:
    """``rows`` with the ``--set`` values under them: a row's own value for a column wins."""
    if not overrides:
        return list(rows)
    return [Row(r.index, r.line, {**overrides, **r.values}) for r in rows]


def used_columns(rows: Sequence[Row]) -> list[str]:
    """Every column some row sets, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for c in row.values:
            seen.setdefault(c, None)
    return list(seen)


def expand_jobs(rows: Sequence[Row], seeds_per_prompt: int = 1, base_seed: int | None = None) -> list[Job]:
    """The jobs of a run: each row with ``seeds_per_prompt`` seeds.

    Row ``r`` gets seeds ``s, s+1, ... s+n-1`` where ``s`` is the row's own ``seed`` column, else
    ``base_seed``; so every prompt is drawn with the same seeds unless it says otherwise, which keeps
    prompts comparable and keeps names stable when rows are added. ``seed`` is ``None`` when neither is set
    (the workflow's own seed is then used as saved).
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"--seeds-per-prompt: expected 1 or more, got {seeds_per_prompt}")
    jobs = []
    for row in rows:
        start = row.values.get("seed", base_seed)
        for k in range(seeds_per_prompt):
            seed = None if start is None else start + k
            if seed is not None and seed > MAX_SEED:
                raise ValueError(f"row {row.index} (line {row.line}): seed {seed} is above {MAX_SEED}")
            settings = {c: v for c, v in row.values.items() if c != "seed"}
            if seed is not None:
                settings["seed"] = seed
            jobs.append(Job(row, k, seed, settings))
    return jobs


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, hex (names uploads by content, so a changed image is a changed job)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
