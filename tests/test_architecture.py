"""The package's import graph: its folders are its layers. A module imports only modules of its own folder or of a
lower one (local imports included), and the graph has no cycle; the package root holds only the jobs and the errors.

A new folder goes into ``FOLDERS``: a module in a folder that is not listed fails the test, so the layering is
decided when the folder is added, not discovered later.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "dilaff_jax"

# Lowest first. "errors" is the one root module every layer may raise; "" is the rest of the root: the jobs.
FOLDERS = (
    "errors",  # the named user errors and exit codes
    "process",  # command line, TensorFlow's environment, host memory, multi-host, preemption, the workdir lock
    "method",  # the paper's maths: affinity, n_k statistics, propagation, Table 5's losses, conventions
    "models",  # ResNet, DeepLabv3+ with the affinity head, ImageNet weight import
    "datasets",  # TFDS builders, the input pipeline
    "engine",  # what every job shares: config checks, state, step, device feeding, checkpoints, inference, metrics, CRF
    "",  # the jobs: main, train, evaluate, predict, export
    "research",  # programs nothing imports: the study and its choices, the propagation diagnosis, the n_k CLI, geometry
)
JOBS = {"main", "train", "evaluate", "predict", "export"}


def folder(module: str) -> str:
  """The layer a module belongs to: ``errors``, its first folder, or "" for the other root modules."""
  if (
      module == "errors"
      or "." not in module
      and module in {"process", "method", "models", "datasets", "engine", "research"}
  ):
    return module
  return module.split(".")[0] if "." in module else ""


def layer(module: str) -> int:
  return FOLDERS.index(folder(module))


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
  """Every node except the bodies of ``if TYPE_CHECKING:`` (annotations only, never executed)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
        stack.extend(child.orelse)
        continue
      stack.append(child)


def project_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package modules ``path`` imports anywhere in its code (top level or inside functions)."""
  out = set()
  for node in _runtime_nodes(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE and not node.level:
      base = node.module[len(PACKAGE) + 1 :]
      for alias in node.names:
        name = f"{base}.{alias.name}" if base else alias.name
        out.add(name if name in modules else base)
    elif isinstance(node, ast.Import):
      out.update(a.name[len(PACKAGE) + 1 :] for a in node.names if a.name.startswith(PACKAGE + "."))
  return out - {""}


def import_graph() -> dict[str, set[str]]:
  paths = {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}
  paths.pop("", None)  # the package's own __init__
  return {m: project_imports(p, set(paths)) - {m} for m, p in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  path: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    path.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return path[path.index(n) :] + [n]
      if n not in state and (cycle := visit(n)):
        return cycle
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_every_module_is_in_a_layer_and_the_root_holds_only_the_jobs_and_the_errors():
  graph = import_graph()
  unknown = sorted(m for m in graph if folder(m) not in FOLDERS)
  assert not unknown, f"add their folders to FOLDERS in {__file__}: {unknown}"
  root = {m for m in graph if "." not in m and folder(m) in ("", "errors")}
  assert root == JOBS | {"errors"}, sorted(root)


def test_the_import_graph_has_no_cycle():
  assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_nothing_imports_a_higher_folder():
  upward = [
      f"{m} ({folder(m) or 'root'}) imports {n} ({folder(n) or 'root'})"
      for m, deps in sorted(import_graph().items())
      for n in sorted(deps)
      if layer(n) > layer(m)
  ]
  assert not upward, "\n".join(upward)


def test_the_layer_rule_sees_an_upward_import():
  assert layer("method.affinity") < layer("engine.train_step") < layer("train") < layer("research.study")
  assert layer("errors") < layer("process.cli") and layer("datasets") == layer("datasets.prepare")
  assert folder("models") == "models" and folder("main") == ""


def test_the_checks_see_local_imports_and_cycles(tmp_path):
  """The checker itself, on a hand-made package: an import inside a function counts, one under TYPE_CHECKING
  does not, and a two-module loop is reported."""
  pkg = tmp_path / PACKAGE
  pkg.mkdir()
  (pkg / "a.py").write_text("def f():\n  from dilaff_jax import b\n  return b\n")
  (pkg / "b.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from dilaff_jax import c\n" "import dilaff_jax.a\n"
  )
  (pkg / "c.py").write_text("x = 1\n")
  modules = {"a", "b", "c"}
  graph = {m: project_imports(pkg / f"{m}.py", modules) for m in modules}
  assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
  assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", ["predict", "export"])
def test_prediction_tools_do_not_import_tensorflow_at_start(module):
  """``predict`` and ``export`` report a mistyped flag or path at once: importing them must not load TensorFlow
  (seconds) through the train state or the checkpoints."""
  import subprocess
  import sys

  code = f"import sys, dilaff_jax.{module}; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False", out.stderr[-2000:]


def _config_leaves(config, prefix: str = ""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _config_leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_config_key_is_read_by_the_package():
  """A key the code never reads is a knob that silently does nothing (``model.eval_output_stride`` was one while
  evaluation read ``eval.output_stride``). Read = its name appears as an attribute or a string in a module other
  than the validator (which checked that dead key too)."""
  import re

  from configs import default

  source = "\n".join(p.read_text() for p in (ROOT / PACKAGE).rglob("*.py") if p.name != "config_checks.py")
  unread = [
      key
      for key in _config_leaves(default.get_config())
      if not re.search(r"(\.{0}\b|[\"']{0}[\"'])".format(re.escape(key.rsplit(".", 1)[-1])), source)
  ]
  assert not unread, f"config keys no module reads: {unread}"


def test_the_training_step_imports_without_tensorflow():
  """The step (and the train state it updates) runs on a JAX-only GPU machine: importing them works with TensorFlow
  and TensorFlow Datasets blocked."""
  import subprocess
  import sys

  code = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from dilaff_jax.engine import train_state as state, train_step as step
print('ok', 'tensorflow' in sys.modules)
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.split() == ["ok", "False"], out.stderr[-3000:]
  # the GPU benchmarks too: a JAX-only GPU machine runs them (their torch peers need only torch)
  imports = "from dilaff_jax.engine import train_state as state, train_step as step"
  assert imports in code
  code = code.replace(imports, "import train_step, affinity_head, propagation, conv_kernels, evaluation")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.split() == ["ok", "False"], out.stderr[-3000:]


def test_a_model_hyper_parameter_lives_in_one_place():
  """``build_model`` passes every ``config.model`` key named like a ``DeepLabV3Plus`` field, refuses a key that is
  neither a field nor a known non-model key, and the checkpoint record covers the shape-deciding fields."""
  from configs import default
  from dilaff_jax.engine import checkpoints, config_checks, run_spec
  from dilaff_jax.engine import train_state as state_lib
  from dilaff_jax.models.deeplab import SHAPE_FIELDS

  config = default.get_config()
  config.model.depth, config.model.aspp_channels, config.model.bn_epsilon = 50, 128, 1e-3
  model = state_lib.build_model(run_spec.derive(config))
  assert (model.depth, model.aspp_channels, model.bn_epsilon) == (50, 128, 1e-3)
  for key in set(config.model) - set(config_checks.NOT_MODEL_FIELDS) - {"dtype"}:
    value = config.model[key]
    assert getattr(model, key) == (tuple(value) if isinstance(value, (list, tuple)) else value), key
  record = checkpoints.compat_record(run_spec.derive(config))
  assert {f"model.{k}" for k in SHAPE_FIELDS} <= set(record) and record["model.depth"] == 50
  config.model.width_multiplier = 2
  with pytest.raises(ValueError, match="width_multiplier"):
    state_lib.build_model(run_spec.derive(config))
  with pytest.raises(config_checks.ConfigError, match=r"^config.model.width_multiplier: no such key"):
    config_checks.validate(config, num_devices=1, mode="predict")  # the user's error, before any model is built


CONFIG_PARAMETERS = {"config", "dataset_config", "scene_config"}


def functions_taking_config_and_rates(source: str) -> list[str]:
  """Functions (and lambdas' enclosing functions) of ``source`` with a config parameter and a ``rates`` one."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      a = node.args
      names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
      if "rates" in names and names & CONFIG_PARAMETERS:
        found.append(f"{node.name} (line {node.lineno})")
  return found


def test_no_function_takes_a_config_and_its_rates():
  """The rate set (and the rest of what a run derives from its config) is derived once, in a ``RunSpec``, and
  passed instead of ``(config, rates)``: a function taking both would let the two disagree."""
  assert functions_taking_config_and_rates("def f(config, x, *, rates=()):\n  pass\n") == ["f (line 1)"]
  assert functions_taking_config_and_rates("def g(spec, rates):\n  pass\ndef h(config):\n  pass\n") == []
  offenders = {
      str(p.relative_to(ROOT)): found
      for p in sorted((ROOT / PACKAGE).rglob("*.py"))
      if (found := functions_taking_config_and_rates(p.read_text()))
  }
  assert offenders == {}


def test_the_run_spec_holds_what_the_config_says():
  from configs import synthetic, voc
  from dilaff_jax.engine import run_spec

  paper = voc.get_config()
  paper.model.pretrained = "weights/resnet101.safetensors"
  spec = run_spec.derive(paper)
  assert spec.rates == ((8, 8), (12, 24), (24, 12), (16, 16)) and spec.has_affinity
  assert (spec.structure, spec.reading, spec.anchored) == ("none", "paper", False)
  assert spec.pretrained == "weights/resnet101.safetensors" and spec.config is paper
  baseline = run_spec.derive(voc.get_config("baseline"))
  assert baseline.rates == () and not baseline.has_affinity
  tiny = synthetic.get_config("tiny")
  tiny.affinity.propagation_reading = "anchored"
  with tiny.unlocked():
    tiny.structure.kind = "aaf"
  spec = run_spec.derive(tiny)
  assert (spec.structure, spec.anchored, spec.pretrained) == ("aaf", True, None)
