"""Documented dataclass fields: each option of a config carries its own one-line doc, which ``--help`` prints.

A config dataclass declares ``name: type = option(default, "what it does")``; :func:`option_docs` reads the
docs back (the experiments' command-line builder shows them), and :func:`option_of` declares a field with the
default and doc of another config's field, so an option shared by two configs is documented once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Key of a field's doc in its ``metadata``.
DOC = "doc"


def option(default: T, doc: str) -> T:
    """A dataclass field with a default and a one-line doc.

    :param default: the default value (immutable; see :func:`option_factory` for lists)
    :param doc: what the option does, as ``--help`` shows it
    :return: the field (typed as its value, so that type checkers read the declaration as a default)
    """
    return dataclasses.field(default=default, metadata={DOC: doc})


def option_factory(factory: Callable[[], T], doc: str) -> T:
    """A dataclass field with a default factory (for lists) and a one-line doc.

    :param factory: builds the default value
    :param doc: what the option does
    :return: the field
    """
    return dataclasses.field(default_factory=factory, metadata={DOC: doc})


def option_of(cls: type, name: str) -> Any:
    """A field with the default and the doc of field ``name`` of config ``cls`` (an option two configs share).

    :param cls: the config dataclass that owns the option
    :param name: the field's name
    :return: the field
    """
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    if source.default is dataclasses.MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata=source.metadata)
    return dataclasses.field(default=source.default, metadata=source.metadata)


def option_docs(cls: type) -> dict[str, str]:
    """The doc of every field of a config dataclass (``""`` for a field declared without one).

    :param cls: the dataclass
    :return: field name -> doc
    """
    return {f.name: str(f.metadata.get(DOC, "")) for f in dataclasses.fields(cls)}
