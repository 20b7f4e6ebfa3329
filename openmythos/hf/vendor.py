"""Self-contained model code next to saved weights, for `trust_remote_code=True` loading where
openmythos is not installed.

`save_pretrained` copies `configuration_openmythos.py` and `modeling_openmythos.py` verbatim (as
transformers does for classes registered with an auto class). Inside the package they import the
core model from it. `vendor_core` gathers every package module they reach, transitively, into one
file, `openmythos_core.py`: the modules' own text in dependency order, minus their imports of
each other. The two files then import from it. One file rather than one per module, because when
loading from a local directory transformers 4.x copies only the modules a file imports directly.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

CORE = "openmythos_core"
_PACKAGE_IMPORT = re.compile(r"^(\s*)from (openmythos(?:\.\w+)*) import ", flags=re.MULTILINE)


# the files save_pretrained copies in; any other .py in the directory is the user's
HF_FILES = ("configuration_openmythos.py", "modeling_openmythos.py")


def vendor_core(directory: Path) -> None:
    files = {p: p.read_text(encoding="utf-8") for p in (directory / name for name in HF_FILES) if p.is_file()}
    files = {p: text for p, text in files.items() if _PACKAGE_IMPORT.search(text)}
    roots = {m for text in files.values() for m in _package_imports(ast.parse(text))}
    core = _flatten(_closure(roots - {m for m in roots if _is_hf(m)}))
    compile(core, CORE, "exec")  # a flattening mistake surfaces here, not at a user's load
    (directory / f"{CORE}.py").write_text(core, encoding="utf-8")
    for path, text in files.items():
        path.write_text(_PACKAGE_IMPORT.sub(_relative, text), encoding="utf-8")


def _is_hf(module: str) -> bool:
    return module.startswith("openmythos.hf.")


def _relative(match: re.Match) -> str:
    # the transformers-facing files keep their names: config.json's auto_map refers to them
    target = match[2].rsplit(".", 1)[1] if _is_hf(match[2]) else CORE
    return f"{match[1]}from .{target} import "


def _package_imports(tree: ast.Module, top_level_only: bool = False) -> list[str]:
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "openmythos" for a in node.names):
            raise RuntimeError(f"cannot vendor `import {node.names[0].name}` (line {node.lineno}): "
                               "write `from openmythos.x import y`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "openmythos" or node.module.startswith("openmythos.")):
            found.append(node.module)
    return found


def _closure(roots: set[str]) -> dict[str, tuple[str, ast.Module]]:
    """Every module reached from `roots`, in an order where each comes after the modules it
    imports at module level (imports inside functions run later and need no order)."""
    sources: dict[str, tuple[str, ast.Module]] = {}
    pending = sorted(roots)
    while pending:
        module = pending.pop()
        if module in sources:
            continue
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec else None
        if origin is None or not origin.endswith(".py") or origin.endswith("__init__.py"):
            raise RuntimeError(f"cannot vendor {module!r}: imports of the package must name a "
                               "module file, not a package")
        text = Path(origin).read_text(encoding="utf-8")
        sources[module] = (text, ast.parse(text))
        pending += _package_imports(sources[module][1])
    ordered: dict[str, tuple[str, ast.Module]] = {}

    def visit(module: str) -> None:
        if module not in ordered:
            for dep in _package_imports(sources[module][1], top_level_only=True):
                visit(dep)
            ordered[module] = sources[module]

    for module in sorted(sources):
        visit(module)
    return ordered


def _flatten(modules: dict[str, tuple[str, ast.Module]]) -> str:
    bound: dict[str, str] = {}  # top-level name -> what binds it; one meaning per name
    listing = "".join(f"    {m}\n" for m in modules)
    parts = ['"""OpenMythos model code for trust_remote_code=True, written by openmythos.hf: these '
             'modules of the\nopenmythos package, in dependency order, without their imports of '
             f'each other.\n\n{listing}\nEdit the package, not this file.\n"""\n\n'
             'from __future__ import annotations\n']
    for module, (text, tree) in modules.items():
        for name, meaning in _bindings(module, tree):
            if bound.setdefault(name, meaning) != meaning:
                raise RuntimeError(f"cannot vendor: {name!r} is both {bound[name]} and {meaning}")
        drop = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _internal(node):
                if any(a.asname not in (None, a.name) for a in node.names):
                    raise RuntimeError(f"cannot vendor {module}: line {node.lineno} renames an "
                                       "import of the package, which one flat module cannot keep")
                drop.update(range(node.lineno - 1, node.end_lineno))
        lines = [line for i, line in enumerate(text.splitlines()) if i not in drop]
        parts.append(f"\n# {'-' * 20} {module} {'-' * 20}\n" + "\n".join(lines).strip() + "\n")
    return "\n".join(parts)


def _internal(node: ast.ImportFrom) -> bool:
    """An import the flattened file does without: `__future__`, or one package module of another."""
    return node.level == 0 and bool(node.module) and (
        node.module == "__future__" or node.module.split(".")[0] == "openmythos")


def _bindings(module: str, tree: ast.Module) -> list[tuple[str, str]]:
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.name, f"defined in {module}"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(n.id, f"defined in {module}") for t in targets for n in ast.walk(t)
                      if isinstance(n, ast.Name)]
        elif isinstance(node, ast.Import):  # `import a.b` binds `a`, `import a.b as c` binds `c`
            found += [(a.asname, f"`import {a.name} as {a.asname}`") if a.asname else
                      (a.name.split(".")[0], f"`import {a.name.split('.')[0]}`") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not _internal(node):
            found += [(a.asname or a.name, f"`from {node.module} import {a.name}`") for a in node.names]
    return found
