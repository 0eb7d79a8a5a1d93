"""The .xlsx format of user export and import (one format, so an export can be imported back).

One worksheet; the first row is the header, one user per following row::

    用户名 | 密码 | 姓名 | 用户组 | 电话 | 邮箱 | 状态
    ctx01  |      | John | group1 | 131… | a@b.c | 启用

- ``密码`` (password) is always empty in an export: passwords are stored only as Argon2id hashes and
  neither they nor the hashes ever leave the controller.  In an import it holds the user's password;
  left empty, the user gets no password and cannot log in until an administrator sets one.
- ``用户组`` is the user group's name; the group must exist when importing.
- ``状态`` is ``启用`` (enabled) or ``禁用`` (disabled); an import also accepts 1/0, true/false,
  enabled/disabled, and empty (enabled).
- Import finds the columns by their header (the Chinese labels above, or ``user_name``, ``passwd``,
  ``name``, ``group``, ``phone``, ``email``, ``enabled``), in any order; ``用户名`` and ``用户组`` are
  required and an unknown header is refused, so that no column is dropped silently.

Everything here blocks and is CPU-bound pure Python (zip, XML): the controller runs it in a separate
process (:mod:`.sheet_worker`), never in the reactor's process, where it would hold the GIL for long
stretches and make the reactor late.  So this module imports nothing from kvmdesk: the worker loads it
by path, without the plugin package and its imports.
"""
from __future__ import annotations

import datetime
import io
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

#: (record field, header label), in column order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("user_name", "用户名"),
    ("passwd", "密码"),
    ("name", "姓名"),
    ("group", "用户组"),
    ("phone", "电话"),
    ("email", "邮箱"),
    ("enabled", "状态"),
)
REQUIRED = ("user_name", "group")
ENABLED_TEXT = {True: "启用", False: "禁用"}
_ALIASES = {
    **{label: field for field, label in COLUMNS},
    **{field: field for field, _ in COLUMNS},
    "username": "user_name", "user name": "user_name", "用户": "user_name", "账号": "user_name",
    "password": "passwd", "用户密码": "passwd",
    "用户姓名": "name",
    "分组": "group", "用户分组": "group", "group_name": "group",
    "手机": "phone", "手机号": "phone", "电话号码": "phone",
    "邮件": "email", "e-mail": "email",
    "启用": "enabled", "是否启用": "enabled", "status": "enabled",
}
_TRUE = {"", "启用", "1", "true", "yes", "enabled", "是"}
_FALSE = {"禁用", "0", "false", "no", "disabled", "否"}
SHEET_TITLE = "users"


class SheetError(Exception):
    """The file cannot be used as a whole.

    :param kind: ``not_xlsx``, ``bad_columns``, ``too_many_rows`` or ``empty``.
    :param params: values for the message (``reason``, ``limit``).
    """

    def __init__(self, kind: str, **params: Any):
        super().__init__(f"{kind}: {params}")
        self.kind = kind
        self.params = params


# -- writing ------------------------------------------------------------------------------------------


def write_users(path: Path, rows: Iterable[Sequence[str]]) -> int:
    """Write the header and ``rows`` (cells in :data:`COLUMNS` order) to ``path`` atomically.

    Every cell is written as text, never as a formula: a name such as ``=HYPERLINK(...)`` stays text.

    :returns: the size of the file in bytes.
    """
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    book = Workbook(write_only=True)
    sheet = book.create_sheet(SHEET_TITLE)
    sheet.append([label for _, label in COLUMNS])
    for row in rows:
        cells = []
        for value in row:
            cell = WriteOnlyCell(sheet, ILLEGAL_CHARACTERS_RE.sub("", value or ""))
            cell.data_type = "s"
            cells.append(cell)
        sheet.append(cells)
    temporary = path.with_name(path.name + ".part")
    try:
        book.save(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path.stat().st_size


def export_row(user: dict[str, Any], group_name: str) -> tuple[str, ...]:
    values = {
        "user_name": user.get("user_name") or "",
        "passwd": "",
        "name": user.get("name") or "",
        "group": group_name,
        "phone": user.get("phone") or "",
        "email": user.get("email") or "",
        "enabled": ENABLED_TEXT[bool(user.get("enabled"))],
    }
    return tuple(values[field] for field, _ in COLUMNS)


# -- reading ------------------------------------------------------------------------------------------


def cell_text(value: Any) -> str:
    """A cell as text: numbers typed into Excel (phone numbers, numeric names) lose no digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def parse_enabled(text: str) -> Optional[bool]:
    """``True``/``False`` for a status cell; ``None`` if it is not a status."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def _check_package(data: bytes, max_unpacked: int) -> None:
    if not data.startswith(b"PK"):
        raise SheetError("not_xlsx", reason="not a zip package (an .xls, .csv or other file?)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            entries = package.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise SheetError("not_xlsx", reason=f"broken zip package ({exc})") from None
    names = {entry.filename for entry in entries}
    if "[Content_Types].xml" not in names or "xl/workbook.xml" not in names:
        raise SheetError("not_xlsx", reason="no Excel workbook inside the package")
    unpacked = sum(entry.file_size for entry in entries)
    if unpacked > max_unpacked:
        raise SheetError("not_xlsx", reason=f"unpacks to {unpacked} bytes, more than {max_unpacked}")


def _header(cells: Sequence[Any]) -> dict[int, str]:
    columns: dict[int, str] = {}
    unknown = []
    for index, value in enumerate(cells):
        text = cell_text(value).strip()
        if not text:
            continue
        field = _ALIASES.get(text.lower()) or _ALIASES.get(text)
        if field is None:
            unknown.append(text)
        elif field in columns.values():
            raise SheetError("bad_columns", reason=f"column {text!r} appears twice")
        else:
            columns[index] = field
    if unknown:
        expected = ", ".join(label for _, label in COLUMNS)
        raise SheetError("bad_columns", reason=f"unknown columns {', '.join(map(repr, unknown))} (expected: {expected})")
    missing = [label for field, label in COLUMNS if field in REQUIRED and field not in columns.values()]
    if missing:
        raise SheetError("bad_columns", reason=f"missing columns {', '.join(missing)}")
    return columns


def read_users(data: bytes, *, max_rows: int, max_unpacked: int) -> list[tuple[int, dict[str, str]]]:
    """``(row number, {field: text})`` for every non-empty row of the first worksheet.

    Row numbers are Excel's (the header is row 1).

    :raises SheetError: not an .xlsx workbook, a bad header, no rows, or more than ``max_rows`` rows.
    """
    _check_package(data, max_unpacked)
    from openpyxl import load_workbook

    try:
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises anything from KeyError to XML syntax errors
        raise SheetError("not_xlsx", reason=f"unreadable workbook ({type(exc).__name__})") from None
    try:
        if not book.worksheets:
            raise SheetError("not_xlsx", reason="no worksheet")
        rows = book.worksheets[0].iter_rows(values_only=True)
        try:
            first = next(rows, None)
            if first is None:
                raise SheetError("empty")
            columns = _header(first)
            found: list[tuple[int, dict[str, str]]] = []
            for number, cells in enumerate(rows, start=2):
                if not any(cell_text(c).strip() for c in cells):
                    continue
                if len(found) >= max_rows:
                    raise SheetError("too_many_rows", limit=max_rows)
                found.append((number, {
                    field: cell_text(cells[index]) if index < len(cells) else "" for index, field in columns.items()
                }))
        except SheetError:
            raise
        except Exception as exc:
            raise SheetError("not_xlsx", reason=f"unreadable worksheet ({type(exc).__name__})") from None
    finally:
        book.close()
    if not found:
        raise SheetError("empty")
    return found
