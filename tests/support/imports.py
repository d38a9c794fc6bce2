"""The modules a piece of Python source imports, for tests of dependencies and import layering."""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class Import:
    """One imported module.

    :param line: the line of the import statement.
    :param module: the module's full dotted name (``from x.y import z`` imports ``x.y``).
    :param optional: the import is inside ``try: ... except ImportError`` (or ``ModuleNotFoundError``).
    """

    line: int
    module: str
    optional: bool


def imports(source: str, filename: str = "<source>") -> list[Import]:
    """Every absolute import in ``source`` (relative ones name no outside module), in no set order."""
    tree = ast.parse(source, filename)
    guarded = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [Import(node.lineno, name, id(node) in guarded) for name in names]
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)
