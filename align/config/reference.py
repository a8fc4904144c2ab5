"""A configuration reference in Markdown, read from the typed config models themselves.

`reference_tables(model, prefix)` walks a pydantic section class and its default instance: one
table per section (dotted path, type with its bounds, default, the field's description), nested
sections after their parent in field order, so the output is the same on every run.
`job_reference()` renders the jobs' `Config`; serve/config_reference.py adds the serving args
and writes docs/configuration.md (`make docs`).
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from align.config import Config

# Longer defaults (prompt templates) are cut: the code that defines them is named in the
# description, and a table cell of a thousand characters helps nobody.
MAX_DEFAULT_CHARS = 80
_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.MinLen, "min_length", "items >="),
)


@dataclass
class Table:
    """One section's keys: `path` is its dotted prefix ('' for the top level)."""

    path: str
    doc: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field (`Section` or `Section | None`), else None."""
    origin = get_origin(annotation)
    if origin is None:  # generics (dict[...]) first: on Python 3.10 they pass isinstance(type)
        return (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    members = [a for a in get_args(annotation) if a is not type(None)]
    if origin in (Union, types.UnionType) and len(members) == 1:
        return section_class(members[0])
    return None


def mapping_class(annotation: Any) -> type[BaseModel] | None:
    """The value class of a `dict[str, Section]` field, else None."""
    if get_origin(annotation) is dict:
        return section_class(get_args(annotation)[1])
    return None


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `str or null`, `dict[str, ScorerConfig]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (dict, list, tuple):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def bounds(metadata: list) -> str:
    """A field's numeric bounds, e.g. '>= 0, < 0.5'."""
    out = []
    for item in metadata:
        for kind, attribute, sign in _BOUNDS:
            if isinstance(item, kind):
                out.append(f"{sign} {getattr(item, attribute)}")
    return ", ".join(out)


def default_text(value: Any) -> str:
    """A default as it would be written in YAML-compatible JSON, cut at MAX_DEFAULT_CHARS."""
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return "keys " + ", ".join(f"`{k}`" for k in value)
    text = json.dumps(to_jsonable_python(value), ensure_ascii=False)
    if len(text) > MAX_DEFAULT_CHARS:
        text = f"{text[: MAX_DEFAULT_CHARS - 3]}... ({len(text)} characters)"
    return f"`{text}`"


def anchor(heading: str) -> str:
    """The link target a code host gives a heading (GitHub's rule: lower case, punctuation
    dropped, spaces to hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped, and outside code spans a `<` that would
    open an HTML tag (`<ranker>`, `<k list>`) written as an entity so that it shows."""
    text = " ".join(text.split()).replace("|", "\\|")
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(
        part if part.startswith("`") else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", part)
        for part in parts
    )


def _doc(cls: type[BaseModel]) -> str:
    """The class's own docstring (not a base class's), first paragraph."""
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_REQUIRED = object()


def _default(info: FieldInfo, instance: BaseModel | None, name: str) -> Any:
    """A field's default: its value in the default instance, else the class's default."""
    if info.is_required():
        return _REQUIRED
    if instance is not None:
        return getattr(instance, name)
    return info.get_default(call_default_factory=True)


def reference_tables(
    cls: type[BaseModel], prefix: str = "", instance: BaseModel | None = None, doc: str = ""
) -> list[Table]:
    """The tables of section `cls` at dotted `prefix`, then of its sections, in field order.

    Args:
        cls: the section class.
        prefix: its dotted path ('' for the root).
        instance: its default value, whose fields give the defaults (None: the class's own).
        doc: text to put before the table (default: the class's docstring).
    Returns:
        The section's table first, then its sections' tables, depth first.
    """
    table, nested = Table(prefix, doc or _doc(cls)), []
    for name, info in cls.model_fields.items():
        path, value = _join(prefix, name), _default(info, instance, name)
        sub, values = section_class(info.annotation), mapping_class(info.annotation)
        if sub is not None:
            shown = value if isinstance(value, BaseModel) else None
            nested += reference_tables(sub, path, shown, info.description or "")
            default = f"section [`{path}`](#{anchor(path)})" + ("" if shown else "; `null`")
        else:
            default = "required" if value is _REQUIRED else default_text(value)
        if values is not None:
            entry = f"{path}.<name>"
            nested += reference_tables(values, entry, None, info.description or "")
            default += f"; each a section [`{entry}`](#{anchor(entry)})"
        kind = type_name(info.annotation)
        if limits := bounds(info.metadata):
            kind += f", {limits}"
        table.rows.append((f"`{path}`", kind, default, info.description or ""))
    return [table, *nested]


def render(tables: list[Table], level: str = "###") -> str:
    """Markdown of `tables`, each under a heading of its dotted path."""
    out = []
    for table in tables:
        out.append(f"{level} `{table.path}`" if table.path else f"{level} Top level")
        out.append("")
        if table.doc:
            out += [_cell(table.doc), ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
        out.append("")
    return "\n".join(out)


def job_reference() -> str:
    """The jobs' configuration (align/config/: Config) as Markdown tables."""
    return render(reference_tables(Config, "", Config()))
