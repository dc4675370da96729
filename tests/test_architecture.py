"""The package's shape: one-way imports, no function-local imports of our
own modules, no private names across modules, modules of at most 600 lines,
no argparse. Read with `ast`; nothing is imported."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ketchup_jax"
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom | ast.Import, module: str) -> list[str]:
  """Our modules an import statement names (a package counts as itself)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:  # relative
      package = module.split(".")
      if not MODULES[module].name == "__init__.py":
        package = package[:-1]
      base = ".".join(package[:len(package) - node.level + 1] +
                      ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
             for a in node.names]
  return sorted({n for n in names if n in MODULES})


def _imports(module: str) -> tuple[set[str], list[str]]:
  """(our modules imported at module level, function-local ones as text)."""
  tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
  top, local = set(), []
  for node in tree.body:  # module level, including under `if`/`try`
    for sub in ast.walk(node):
      if isinstance(sub, (ast.Import, ast.ImportFrom)):
        inside = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef,
                                    ast.Lambda, ast.ClassDef))
                     for p in _parents(node, sub))
        for name in _resolve(sub, module):
          if inside:
            local.append(f"{MODULES[module].name}:{sub.lineno} {name}")
          else:
            top.add(name)
  top.discard(module)
  return top, local


def _parents(root: ast.AST, target: ast.AST) -> list[ast.AST]:
  """The nodes from `root` down to `target`'s parent."""
  stack = [(root, [])]
  while stack:
    node, path = stack.pop()
    if node is target:
      return path
    for child in ast.iter_child_nodes(node):
      stack.append((child, path + [node]))
  return []


GRAPH = {m: _imports(m)[0] for m in MODULES}


def _cycle() -> list[str] | None:
  """One import cycle among our modules, or None."""
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done

  def visit(m: str, path: list[str]) -> list[str] | None:
    state[m] = 1
    for n in sorted(GRAPH[m]):
      if state.get(n) == 1:
        return path[path.index(n):] + [n] if n in path else path + [n]
      if n not in state:
        found = visit(n, path + [n])
        if found:
          return found
    state[m] = 2
    return None

  for m in sorted(GRAPH):
    if m not in state:
      found = visit(m, [m])
      if found:
        return found
  return None


def test_the_package_has_no_import_cycle():
  # A package's __init__ importing its own submodules is its API, not a
  # dependency of theirs on it; leave those edges out.
  for m in GRAPH:
    GRAPH[m] = {n for n in GRAPH[m] if not (
        MODULES[n].name == "__init__.py" and m.startswith(n + "."))}
  assert _cycle() is None, " -> ".join(_cycle())


def test_no_function_imports_our_modules():
  local = [entry for m in MODULES for entry in _imports(m)[1]]
  assert not local, local


def test_no_private_name_of_another_module_is_used():
  used = []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        for a in node.names:
          if a.name.startswith("_") and a.name != "__future__":
            used.append(f"{path.name}:{node.lineno} imports {a.name}")
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for a in node.names:
          full = _resolve(node, module) if isinstance(node, ast.ImportFrom) \
              else [a.name]
          if any(f in MODULES for f in full):
            aliases[a.asname or a.name.split(".")[-1]] = True
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__")
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        used.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
  assert not used, used


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_at_most_600_lines(module):
  lines = MODULES[module].read_text(encoding="utf-8").count("\n")
  assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines"


def test_argparse_is_gone():
  users = [str(p) for p in MODULES.values()
           if "argparse" in _imported_names(p)]
  assert not users, users


def _imported_names(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_the_checks_see_what_they_check():
  # The walk finds known edges: a broken walk would pass everything above.
  assert "ketchup_jax.train.steps" in GRAPH["ketchup_jax.train.rollouts"]
  assert "ketchup_jax.train.context" in GRAPH["ketchup_jax.train.pipeline"]
  assert len(MODULES) > 30
