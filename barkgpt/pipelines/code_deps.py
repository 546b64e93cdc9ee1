"""A stage's code dependencies, derived from the static import graph (never listed by hand).

The roots are what a stage runs: its function, and the pipeline's own behaviour (the pipeline
class, its params class). From a root we follow the names it uses, through the project:

- a function or class uses the module-level names it mentions, the imports written inside it
  (lazy imports are imports too: they run whenever that code runs), and, through them, the
  functions and classes of other modules; `from M import f` follows `f`, `M.f` follows `f`,
  and a module used as a whole (passed around, or re-exported) counts whole;
- the result is every project file that holds one of those names: DVC sees a change to any of
  them, so editing any function of a file in the closure makes the stage stale.

Names, not modules, because a module gathers many entry points (barkgpt/stages.py holds every
shared stage) and a stage must not depend on its neighbours' imports; the file is still the unit
DVC hashes. What static analysis cannot see (a name looked up by string, importlib) must not
carry behaviour in a stage's code; the project has none. Imports outside `barkgpt` are the
environment's business (requirements.lock), not a stage dependency.
"""
from __future__ import annotations

import ast
import inspect
from functools import cache
from pathlib import Path

PACKAGE = "barkgpt"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds barkgpt/


@cache
def module_file(module: str) -> Path | None:
    """barkgpt.x.y -> barkgpt/x/y.py or barkgpt/x/y/__init__.py; None outside the project."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = SOURCE_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


class Module:
    """One parsed project module: what each top-level name is bound to."""

    def __init__(self, name: str):
        self.name = name
        self.path = module_file(name)
        self.is_package = self.path.name == "__init__.py"
        self.tree = ast.parse(self.path.read_text(encoding="utf-8"), str(self.path))
        self.defs: dict[str, list[ast.AST]] = {}  # name -> the top-level statements that bind it
        self.imports: dict[str, tuple[str, str | None]] = {}  # name -> (module, symbol or None)
        for node in self.tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for bound, target in self.import_targets(node):
                    self.imports[bound] = target
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.defs.setdefault(name.id, []).append(node)

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.name.split(".")
        base = parts if self.is_package else parts[:-1]
        base = base[: len(base) - node.level + 1]
        return ".".join([*base, *([node.module] if node.module else [])])

    def import_targets(self, node: ast.Import | ast.ImportFrom) -> list[tuple[str, tuple[str, str | None]]]:
        """(the name bound, (project module, symbol or None for the whole module)) per imported name."""
        out = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if module_file(alias.name):
                    # `import barkgpt.x` binds `barkgpt`; `import barkgpt.x as m` binds m to barkgpt.x
                    out.append((alias.asname or alias.name.split(".")[0],
                                (alias.name if alias.asname else alias.name.split(".")[0], None)))
            return out
        base = self.absolute(node)
        if not module_file(base):
            return out
        for alias in node.names:
            bound = alias.asname or alias.name
            if alias.name == "*":
                out.append(("*", (base, None)))
            elif module_file(f"{base}.{alias.name}"):
                out.append((bound, (f"{base}.{alias.name}", None)))
            else:
                out.append((bound, (base, alias.name)))
        return out


@cache
def parse(module: str) -> Module:
    return Module(module)


def closure(roots: list[tuple[str, str | None]], attributes: set[str] | None = None) -> set[Path]:
    """The project files holding every name reachable from `roots`: (module, top-level name), or
    (module, None) for a whole module. `attributes` collects every attribute name the reached code
    reads (`pipe.evaluate` -> "evaluate"): what it may ask of an object it was handed."""
    files: set[Path] = set()
    seen: set[tuple[str, str | None]] = set()
    todo = list(roots)
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        module, name = item
        mod = parse(module)
        files.add(mod.path)
        if name is None:
            nodes = mod.tree.body  # the whole module: every statement, every function in it
        elif name in mod.imports:  # a re-export (`from barkgpt.tracking.runs import git_commit`)
            todo.append(mod.imports[name])
            continue
        elif name in mod.defs:
            nodes = mod.defs[name]
        elif name == "":  # the module's file only (where a lambda is written)
            continue
        elif mod.is_package and module_file(f"{module}.{name}"):
            todo.append((f"{module}.{name}", None))
            continue
        else:
            continue  # a name set some other way (e.g. a module attribute): the file already counts
        for node in nodes:
            todo.extend(uses(mod, node))
            if attributes is not None:
                attributes.update(n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute))
    return files


def uses(mod: Module, node: ast.AST) -> list[tuple[str, str | None]]:
    """What one statement uses: module-level names, imports written inside it, attributes of modules
    (`runs.promote` follows `promote`; a module used bare, e.g. passed as a value, counts whole)."""
    bindings = dict(mod.imports)
    out = []
    for child in ast.walk(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for bound, target in mod.import_targets(child):
                bindings[bound] = target
                if target[1] is not None:
                    out.append(target)
    inner = {id(c.value) for c in ast.walk(node) if isinstance(c, ast.Attribute)}
    resolved: set[int] = set()  # names that start a module attribute chain already followed
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and id(child) not in inner:
            chain = attribute_chain(child)
            if chain and chain[0] in bindings and bindings[chain[0]][1] is None:
                out.append(resolve_attribute(bindings[chain[0]][0], chain[1:]))
                resolved.add(id(chain_root(child)))
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and id(child) not in resolved:
            if child.id in bindings:
                out.append(bindings[child.id])
            elif child.id in mod.defs:
                out.append((mod.name, child.id))
    return out


def attribute_chain(node: ast.Attribute) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def chain_root(node: ast.Attribute) -> ast.Name:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def resolve_attribute(module: str, attrs: list[str]) -> tuple[str, str | None] | None:
    """`barkgpt.export.pipeline.export_files` -> (barkgpt.export.pipeline, export_files)."""
    for attr in attrs:
        if module_file(f"{module}.{attr}"):
            module = f"{module}.{attr}"
        else:
            return module, attr
    return module, None


def roots_of(obj) -> list[tuple[str, str | None]]:
    """A function or class -> [(its module, its top-level name)] (a method: its class); a lambda or
    a function defined inside another -> the names it uses (not the statement around it, e.g. a
    whole pipeline declaration)."""
    module = getattr(obj, "__module__", None)
    if not module or not module_file(module):
        return []
    qualname = getattr(obj, "__qualname__", "")
    if "<" not in qualname:
        return [(module, qualname.split(".")[0])]
    mod = parse(module)
    line = obj.__code__.co_firstlineno
    kinds = ast.Lambda if qualname.endswith("<lambda>") else (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(mod.tree) if isinstance(n, kinds)
             and (n.lineno == line or any(d.lineno == line for d in getattr(n, "decorator_list", [])))]
    return [found for node in nodes for found in uses(mod, node)] + [(module, "")]


def code_files(objects, attributes: set[str] | None = None) -> list[str]:
    """The project files (relative to the folder that holds barkgpt/, sorted) that the given
    functions and classes reach; `attributes`: see closure()."""
    files = closure([r for obj in objects for r in roots_of(obj)], attributes)
    return sorted(f.relative_to(SOURCE_ROOT).as_posix() for f in files)


def stage_code(run, hooks: dict[str, list], always: list) -> list[str]:
    """A stage's code: the closure of its function `run`, of `always` (e.g. its params class), and
    of each hook (a pipeline's field name -> the functions and classes in it) whose name the code
    reached so far reads as an attribute (`pipe.evaluate(...)` brings the pipeline's evaluation in;
    a data stage that never asks for it does not depend on it)."""
    roots, used = [run, *always], set()
    while True:
        attributes: set[str] = set()
        files = code_files(roots, attributes)
        wanted = {name for name in hooks if name in attributes} - used
        if not wanted:
            return files
        used |= wanted
        roots += [c for name in sorted(wanted) for c in hooks[name]]


def callables_of(value) -> list:
    """The functions and classes inside a value (a dict's values, a tuple's items)."""
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismethod(value):
        return [value]
    if isinstance(value, dict):
        return [c for v in value.values() for c in callables_of(v)]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in callables_of(v)]
    return []
