"""``python -m dilaff_jax.models.convert``: a torchvision-layout ResNet checkpoint becomes the weights file that
``config.model.pretrained`` reads, holding exactly the input's tensors; wrong inputs end in one ``error:`` line."""

import importlib.util
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from dilaff_jax import errors
from dilaff_jax.models import convert
from dilaff_jax.models.deeplab import DeepLabV3Plus
from dilaff_jax.models.pretrained import load_pretrained_backbone
from cli_helpers import assert_one_error_line, run_cli

_spec = importlib.util.spec_from_file_location(
    "make_torch_resnet_fixture", Path(__file__).parent / "fixtures" / "make_torch_resnet_fixture.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
  """(torchvision-layout ResNet-18 state dict with fc and num_batches_tracked, its .safetensors file); written
  with numpy only, as a checkpoint saved by safetensors.torch.save_file is."""
  _, state_dict, _ = fixtures.load_fixture("resnet18")
  state_dict = dict(state_dict)
  state_dict["fc.weight"] = np.ones((1000, 512), np.float32)
  state_dict["fc.bias"] = np.ones((1000,), np.float32)
  state_dict["bn1.num_batches_tracked"] = np.array(7, np.int64)
  path = tmp_path_factory.mktemp("weights") / "resnet18_torchvision.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  return state_dict, path


def _model_variables():
  model = DeepLabV3Plus(
      num_classes=3,
      rates=((2, 2),),
      depth=18,
      multi_grid=None,
      aspp_channels=8,
      low_level_channels=4,
      decoder_channels=8,
  )
  shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_converted_file_loads_into_the_model_with_exactly_the_input_tensors(resnet18, tmp_path, capsys):
  state_dict, source = resnet18
  output = tmp_path / "resnet18.safetensors"
  assert convert.main([f"--input={source}", f"--output={output}", "--depth=18"]) == 0
  out = capsys.readouterr().out
  ignored = {k for k in state_dict if k.startswith("fc.") or k.endswith("num_batches_tracked")}
  assert len(ignored) == 2 + 20  # fc, and one counter per BatchNorm
  assert "ResNet-18 (standard stem)" in out and "11,176,512 parameters" in out and f"dropped {len(ignored)}" in out
  with safe_open(str(output), "np") as f:
    assert set(f.keys()) == set(state_dict) - ignored
    assert f.metadata() == {"format": convert.FORMAT, "depth": "18", "stem": "standard", "source": source.name}
  loaded = load_pretrained_backbone(_model_variables(), output, depth=18)
  backbone = {c: loaded[c]["backbone"] for c in ("params", "batch_stats")}
  checked = 0
  for key, value in state_dict.items():  # brute force: every backbone tensor of the input, found by its own name
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
      continue
    *modules, leaf = key.split(".")
    names = []
    for m in modules:  # layer3.1.downsample.0 -> layer3_1 / downsample_0
      if m.isdigit():
        names[-1] += f"_{m}"
      else:
        names.append(m)
    collection = "batch_stats" if leaf.startswith("running_") else "params"
    node = backbone[collection]
    for n in names:
      node = node[n]
    name = {"running_mean": "mean", "running_var": "var", "bias": "bias"}.get(leaf)
    if name is None:
      name = "kernel" if value.ndim == 4 else "scale"
    got = np.asarray(node[name])
    expected = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    np.testing.assert_array_equal(got, expected, err_msg=key)
    checked += 1
  assert checked == len(state_dict) - len(ignored) == 100


def test_wrong_depth_non_resnet_and_bad_paths_are_one_error_line(resnet18, tmp_path, capsys):
  _, source = resnet18
  output = tmp_path / "out.safetensors"
  proc = run_cli("dilaff_jax.models.convert", f"--input={source}", f"--output={output}", "--depth=34")
  assert_one_error_line(proc, "holds a ResNet-18", "the model is a ResNet-34", str(source))
  other = tmp_path / "bert.safetensors"
  save_file({"embeddings.word.weight": np.zeros((4, 2), np.float32)}, str(other))
  cases = [
      ([f"--input={other}", f"--output={output}", "--depth=18"], "not a ResNet's"),
      ([f"--input={tmp_path / 'none.safetensors'}", f"--output={output}", "--depth=18"], "does not exist"),
      ([f"--input={source}", f"--output={tmp_path / 'out.pth'}", "--depth=18"], "is a .safetensors file"),
      ([f"--input={source}", f"--output={tmp_path / 'no' / 'o.safetensors'}", "--depth=18"], "does not exist"),
      ([f"--input={source}", f"--output={source}", "--depth=18"], "is the input file"),
      ([f"--input={source}", f"--output={output}", "--depth=19"], "--depth=19"),
      ([f"--input={source}", f"--output={output}"], "--depth is required"),
      ([f"--input={source}", f"--output={output}", "--depth=18", "--stem=deep"], "deep stem"),
  ]
  for argv, expected in cases:
    assert convert.main(argv) == errors.EXIT_USER_ERROR, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
  assert not output.exists()


def test_pth_without_torch_says_to_install_it(tmp_path, monkeypatch, capsys):
  source = tmp_path / "resnet18.pth"
  source.write_bytes(b"a torch pickle")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, installed or not
  assert convert.main([f"--input={source}", f"--output={tmp_path / 'o.safetensors'}", "--depth=18"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "needs torch" in err[0] and "install torch" in err[0]
