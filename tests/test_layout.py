"""The package's shape (docs/design.md): imports run one way, and the command line starts
without JAX. Both read the real source with `ast` or run a real subprocess."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "knots_jax"

# The layers, bottom first: a module may import its own layer and the layers before it.
LAYERS = [
    {"checks"},
    {"parallel", "io"},
    {"adapters"},
    {"models"},
    {"methods"},
    {"alignment"},
    {"merging"},
    {"export"},
    {"evaluation"},
    {"experiments"},
    {"pipeline"},
    {"cli"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _part(module: str) -> str:
  """`knots_jax.merging.kernels` -> `merging`; `knots_jax.checks` -> `checks`."""
  return module.split(".")[1]


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path


def _imports(path: pathlib.Path, module: str):
  """Every knots_jax module `path` imports (at any depth: local imports count too)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("knots_jax."))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module or ""
      if name == "knots_jax":
        yield from (f"knots_jax.{a.name}" for a in node.names)
      elif name.startswith("knots_jax."):
        yield name


def test_every_part_of_the_package_has_a_layer():
  parts = {_part(m) for m, _ in _modules() if m != "knots_jax"}
  assert parts <= set(LAYER_OF), f"modules outside the layer table: {parts - set(LAYER_OF)}"


def test_imports_run_one_way():
  wrong = []
  for module, path in _modules():
    if module == "knots_jax":
      continue   # the public API re-exports from every layer (lazily)
    own = LAYER_OF[_part(module)]
    for target in _imports(path, module):
      if target == "knots_jax" or LAYER_OF[_part(target)] > own:
        wrong.append(f"{module} imports {target}")
  assert not wrong, "imports against the direction of docs/design.md:\n" + "\n".join(wrong)


def test_the_direction_check_catches_a_wrong_import(tmp_path):
  """The check itself can fail: an evaluation module importing an experiment is caught."""
  path = tmp_path / "bad.py"
  path.write_text("from knots_jax.experiments.offline import benchmark\n")
  targets = list(_imports(path, "knots_jax.evaluation.bad"))
  assert targets == ["knots_jax.experiments.offline"]
  assert LAYER_OF[_part(targets[0])] > LAYER_OF["evaluation"]


def _no_jax(code: str) -> subprocess.CompletedProcess:
  script = ("import sys\n" + code +
            "\nassert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)[:5]\n")
  return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["presets"], ["merge", "--help"],
                                  ["merge", "--config", "configs/merge.py", "--config.topk=3"],
                                  ["merge", "--config", "configs/demo.py",
                                   "--config.dry_run=true"],
                                  ["merge", "--config", "configs/merge.py:sftm_vit_b32",
                                   "--config.adapters=assets/demo/adapters/task_a",
                                   "--config.dry_run=true"]])
def test_commands_that_compute_nothing_do_not_import_jax(argv):
  done = _no_jax(f"from knots_jax.cli import main\nmain.run({argv!r})")
  assert done.returncode == 0, done.stderr


def test_the_public_api_is_lazy_and_complete():
  done = _no_jax("import knots_jax\nassert callable(knots_jax.load_adapters)\n"
                 "knots_jax.MergeConfig(method='ties')")
  assert done.returncode == 0, done.stderr
  import knots_jax
  for name in knots_jax.__all__:
    assert getattr(knots_jax, name) is not None, name
