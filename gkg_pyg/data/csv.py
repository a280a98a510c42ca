"""CSV multi-label format: one row per image, its path and its labels.

Two layouts, with a header row in both:

* ``names``: an image column and a labels column holding the label names
  separated by ``label_delimiter`` (default a space; use e.g. ``|`` when
  names contain spaces)::

      image,labels
      photos/0001.jpg,dog person
      photos/0002.jpg,cat

* ``columns``: an image column and one 0/1 column per class (the header
  gives the class names)::

      image,dog,cat,person
      photos/0001.jpg,1,0,1
      photos/0002.jpg,0,1,0

Image paths are relative to ``image_root`` (absolute paths stay as they
are). The class list is given (``classes``: names, or a text file with one
name per line), or taken from the file: the sorted set of all names of the
training CSV for ``names``, the header's class columns in their order for
``columns``. The evaluation split uses the training split's class list
(``build_dataset`` passes it), so both always agree.

Errors name the file and the row: an unknown label name or class column
(not in a given or training class list), a value other than 0/1 in a class
column, a missing column, an empty image path, an image listed twice. Rows
without any label follow ``empty_labels`` ("drop", "keep" as all-negative,
or "error"); the rows dropped or kept are counted in an INFO record of the
``gkg_pyg.data`` logger, which the scripts print.
Missing or undecodable image files are the up-front image check's business
(``gkg_pyg.data.check_dataset``: an error naming them, or with
``skip_bad_images`` left out and counted).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import DataError, MissingFileError
from .base import EMPTY_LABELS, ImageLabelDataset, handle_empty_rows

__all__ = ["CSV_FORMATS", "CsvDataset", "read_class_list", "csv_class_names"]

CSV_FORMATS = ("names", "columns")


def read_class_list(
    classes: Sequence[str] | str | os.PathLike | None, source: str = "the given class list"
) -> list[str] | None:
    """A class list given as names, or as a text file with one name per line
    (blank lines and lines starting with ``#`` ignored); None stays None.
    ``source`` names given names in errors (a file names itself)."""
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise MissingFileError(f"class list file not found: {path}")
        names = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        source = str(path)
    else:
        names = [str(n).strip() for n in classes]
    if not names:
        raise DataError(f"{source} is empty")
    if any(not n for n in names):
        raise DataError(f"{source} holds an empty class name")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{source} lists {', '.join(map(repr, twice))} more than once")
    return names


def _read_rows(csv_file: Path, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV file; blank rows skipped."""
    if not csv_file.is_file():
        raise MissingFileError(f"CSV file not found: {csv_file}")
    with csv_file.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        reader = csv.reader(f, delimiter=delimiter)
        header = None
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
            else:
                rows.append((reader.line_num, cells))
    if header is None:
        raise DataError(f"{csv_file} is empty (it needs a header row)")
    return header, rows


def _column(header: list[str], name: str, csv_file: Path, key: str) -> int:
    if name not in header:
        raise DataError(f"{csv_file} has no column {name!r} (data.csv.{key}); its columns: {header}")
    return header.index(name)


def _split_names(cell: str, label_delimiter: str) -> list[str]:
    parts = cell.split() if label_delimiter.strip() == "" else cell.split(label_delimiter)
    return [p.strip() for p in parts if p.strip()]


def csv_class_names(
    csv_file: str | os.PathLike, fmt: str = "names", image_column: str = "image",
    labels_column: str = "labels", delimiter: str = ",", label_delimiter: str = " ",
) -> list[str]:  # fmt: skip
    """The class list a CSV file defines: its sorted label names (``names``)
    or its class columns in header order (``columns``)."""
    csv_file = Path(csv_file)
    header, rows = _read_rows(csv_file, delimiter)
    image_col = _column(header, image_column, csv_file, "image_column")
    if fmt == "columns":
        names = [h for i, h in enumerate(header) if i != image_col]
        if not names:
            raise DataError(f"{csv_file} has no class column besides {image_column!r}")
        return read_class_list(names, source=f"the header of {csv_file}")
    if fmt != "names":
        raise DataError(f"unknown CSV format {fmt!r}; expected one of {CSV_FORMATS}")
    label_col = _column(header, labels_column, csv_file, "labels_column")
    names = set()
    for _, cells in rows:
        if label_col < len(cells):
            names.update(_split_names(cells[label_col], label_delimiter))
    if not names:
        raise DataError(f"{csv_file} holds no label name at all")
    return sorted(names)


class CsvDataset(ImageLabelDataset):
    """Multi-label images listed in a CSV file (formats in the module docstring).

    Args:
        csv_file: the CSV file.
        image_root: folder the image paths are relative to (default: the
            CSV file's folder).
        transform, skip_bad_images: see ``ImageLabelDataset``.
        fmt: "names" or "columns".
        classes: the class list (names or a file); None: from ``csv_file``
            (``csv_class_names``).
        image_column, labels_column: column names (labels_column: ``names`` only).
        delimiter: the CSV column separator (``","``; ``"\\t"`` for TSV).
        label_delimiter: separates names inside the labels cell; blank
            (the default ``" "``) splits on any run of whitespace.
        empty_labels: rows without a label: "drop", "keep" or "error".
    """

    def __init__(
        self,
        csv_file: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        fmt: str = "names",
        classes: Sequence[str] | str | os.PathLike | None = None,
        image_column: str = "image",
        labels_column: str = "labels",
        delimiter: str = ",",
        label_delimiter: str = " ",
        empty_labels: str = "drop",
    ) -> None:
        if fmt not in CSV_FORMATS:
            raise DataError(f"unknown CSV format {fmt!r}; expected one of {CSV_FORMATS}")
        if empty_labels not in EMPTY_LABELS:
            raise DataError(f"empty_labels must be one of {EMPTY_LABELS}, got {empty_labels!r}")
        if len(delimiter) != 1:
            raise DataError(f"the CSV delimiter must be one character, got {delimiter!r}")
        if label_delimiter == "":
            # YAML reads a bare | (e.g. --set data.csv.label_delimiter=|) as an empty block scalar.
            raise DataError('the label delimiter is empty; in YAML and --set quote it: label_delimiter: "|"')
        csv_file = Path(csv_file)
        root = Path(image_root) if image_root is not None else csv_file.parent
        names = read_class_list(classes)
        if names is None:
            names = csv_class_names(csv_file, fmt, image_column, labels_column, delimiter, label_delimiter)
        column = {n: i for i, n in enumerate(names)}
        header, rows = _read_rows(csv_file, delimiter)
        image_col = _column(header, image_column, csv_file, "image_column")
        if fmt == "names":
            label_col = _column(header, labels_column, csv_file, "labels_column")
        else:
            missing = [n for n in names if n not in header]
            if missing:
                raise DataError(f"{csv_file} has no column for the classes {missing}; its columns: {header}")
            # Every other column is a class column: one the class list lacks would drop its labels.
            unknown = [h for i, h in enumerate(header) if i != image_col and h not in column]
            if unknown:
                raise DataError(
                    f"{csv_file} has class columns {unknown} that are not among the {len(names)} classes "
                    f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); list them in data.classes"
                )
            class_cols = [header.index(n) for n in names]
        if not rows:
            raise DataError(f"{csv_file} lists no image")

        targets = np.zeros((len(rows), len(names)), dtype=np.float32)
        paths, lines, first_line = [], [], {}
        for row, (line, cells) in enumerate(rows):
            where = f"{csv_file}, line {line}"
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} cells for {len(header)} columns")
            rel = cells[image_col].strip()
            if not rel:
                raise DataError(f"{where}: empty image path")
            path = str(root / rel)
            if path in first_line:
                raise DataError(f"{where}: image {rel!r} is listed twice (first on line {first_line[path]})")
            first_line[path] = line
            if fmt == "names":
                for name in _split_names(cells[label_col], label_delimiter):
                    if name not in column:
                        raise DataError(
                            f"{where}: unknown label {name!r} (the {len(names)} classes: "
                            f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                        )
                    targets[row, column[name]] = 1.0
            else:
                for name, col in zip(names, class_cols):
                    value = cells[col].strip()
                    if value not in ("0", "1"):
                        raise DataError(f"{where}: column {name!r} holds {value!r}; class columns hold 0 or 1")
                    targets[row, column[name]] = float(value)
            paths.append(path)
            lines.append(line)

        keep, empty = handle_empty_rows(
            targets, empty_labels, str(csv_file), lambda r: f"line {lines[r]} {rows[r][1][image_col].strip()!r}",
            unit="rows",
        )  # fmt: skip
        if not keep:
            raise DataError(f"{csv_file}: no image has a label (data.empty_labels=keep keeps unlabelled rows)")
        super().__init__(
            [paths[r] for r in keep],
            torch.from_numpy(targets[keep]),
            torch.zeros(len(keep), len(names)),
            names,
            transform,
            skip_bad_images,
        )
        self.csv_file = csv_file
        self.image_root = root
        self.num_without_labels = len(empty)
