"""The package's shape: layers that import one way, no cycles, no reaching into private names, short
modules. (Rules of docs/design.md §8.)"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jdfp"
MAX_MODULE_LINES = 500

# Which layers each layer of jdfp/_src may import (numerics <- ffi <- ops <- flax / optax / parallel).
ALLOWED = {
    "numerics": {"numerics"},
    "ffi": {"numerics", "ffi"},
    "ops": {"numerics", "ffi", "ops"},
    "flax": {"numerics", "ffi", "ops", "flax"},
    "optax": {"numerics", "ops", "optax"},  # ops: the kernel conversions of master_weights
    "parallel": {"numerics", "ops", "parallel"},
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: pathlib.Path):
  """(imported module, imported name or None) for every import statement, top level or not."""
  m = _module_name(path)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, None
    elif isinstance(node, ast.ImportFrom):
      yield from _imports_of(node, m, path)


def _jdfp_deps(name: str) -> set[str]:
  return {m for m, _ in _imports(MODULES[name]) if m in MODULES and m != name}


def _layer(name: str):
  parts = name.split(".")
  return parts[2] if len(parts) > 2 and parts[1] == "_src" else None


def test_no_import_cycles():
  graph = {m: _jdfp_deps(m) for m in MODULES}
  # Package __init__ files that re-export (jdfp, jdfp.kernels, ...) sit above everything; a cycle
  # through them is an import-order hazard all the same, so they are included.
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycle = stack[stack.index(d):] + [d]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d, stack + [d])
    state[m] = 2

  for m in MODULES:
    if m not in state:
      visit(m, [m])


def test_layers_import_one_way():
  bad = []
  for m in MODULES:
    layer = _layer(m)
    if layer is None:
      continue
    for d in _jdfp_deps(m):
      dl = _layer(d)
      if d.startswith("jdfp._src") and dl not in ALLOWED[layer]:
        bad.append(f"{m} imports {d}")
      elif not d.startswith("jdfp._src"):
        bad.append(f"{m} imports the public package {d}")
  assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
  bad = []
  for m, path in MODULES.items():
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom):
        for mod, name in _imports_of(node, m, path):
          if name is not None and name.startswith("_") and mod.startswith("jdfp"):
            bad.append(f"{m} imports {mod}.{name}")
          if name is None:
            aliases[_alias(node, mod)] = mod
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith("jdfp"):
            aliases[a.asname or a.name] = a.name
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        bad.append(f"{m} uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)


def _imports_of(node, m, path):
  pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
  base = node.module or ""
  if node.level:
    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
  for a in node.names:
    sub = f"{base}.{a.name}"
    yield (sub, None) if sub in MODULES else (base, a.name)


def _alias(node, mod):
  for a in node.names:
    if mod.endswith("." + a.name):
      return a.asname or a.name
  return mod


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_short(name):
  n = len(MODULES[name].read_text().splitlines())
  assert n <= MAX_MODULE_LINES, f"{name} has {n} lines (max {MAX_MODULE_LINES})"


def test_public_surface_is_sorted_by_layer_and_explicit():
  import jdfp  # pylint: disable=import-outside-toplevel
  assert len(jdfp.__all__) == len(set(jdfp.__all__))
  for name in jdfp.__all__:
    assert hasattr(jdfp, name), name
  # No whole private module is exported.
  assert not any(getattr(getattr(jdfp, n), "__name__", "").startswith("jdfp._src") and
                 type(getattr(jdfp, n)).__name__ == "module" for n in jdfp.__all__)


MAX_CPP_FUNCTION_LINES = 100


def _cpp_functions(text: str):
  """(first line, line count) of every top-level function body in C++ source (comments, strings and
  preprocessor lines stripped; namespaces and classes looked into; lambdas stay inside their function)."""
  text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
  text = re.sub(r"//[^\n]*", "", text)
  text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
  text = re.sub(r"(?m)^\s*#.*$", "", text)
  stack, line = [], 1
  for m in re.finditer(r"[{}\n]", text):
    if m.group(0) == "\n":
      line += 1
    elif m.group(0) == "{":
      head = text[max(0, m.start() - 400):m.start()].rstrip()
      container = re.search(r"\b(namespace|struct|class|union|enum)\b[^;{}()]*$", head) is not None
      is_fn = (not container and not any(kind == "fn" for kind, _ in stack)
               and re.search(r"\)\s*(const|noexcept|override|final|mutable|\s|->\s*[\w:<>,\s*&]+)*$", head) is not None
               and re.search(r"\b(if|for|while|switch|catch)\s*\([^;{}]*\)\s*$", head) is None)
      stack.append(("fn" if is_fn else ("container" if container else "block"), line))
    else:
      kind, start = stack.pop()
      if kind == "fn":
        yield start, line - start + 1


@pytest.mark.parametrize("path", sorted((ROOT / "xla_ffi").glob("*.[ch]*")), ids=lambda p: p.name)
def test_cpp_functions_are_short(path):
  long = [(start, n) for start, n in _cpp_functions(path.read_text()) if n > MAX_CPP_FUNCTION_LINES]
  assert not long, f"{path.name}: functions over {MAX_CPP_FUNCTION_LINES} lines at " + \
      ", ".join(f"line {s} ({n} lines)" for s, n in long)
