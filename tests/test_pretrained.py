"""ImageNet weight import: torchvision/timm state dicts -> ResNet variables, with every error named."""

import importlib.util
import re
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dilaff_jax import errors
from dilaff_jax.models.deeplab import DeepLabV3Plus
from dilaff_jax.models.resnet import ResNet
from dilaff_jax.models.pretrained import (
    PretrainedWeightsError,
    load_pretrained_backbone,
    load_resnet_state_dict,
    torch_resnet_to_flax,
)

_spec = importlib.util.spec_from_file_location(
    "make_torch_resnet_fixture", Path(__file__).parent / "fixtures" / "make_torch_resnet_fixture.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(scope="module")
def resnet26():
  """(torchvision state dict of the ResNet-26 fixture, torch's outputs)."""
  _, state_dict, outputs = fixtures.load_fixture("resnet26")
  return state_dict, outputs


def _save(tmp_path, state_dict, name="weights.safetensors"):
  path = tmp_path / name
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  return path


def _random_variables(model, seed):
  """Variables of `model` with random values, from `jax.eval_shape` (cheaper than compiling a real init)."""
  shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)


def _to_torch(variables):
  """Independent inverse of the conversion (the test's own): flax variables -> torchvision state dict."""
  names = {
      ("params", "kernel"): "weight",
      ("params", "scale"): "weight",
      ("params", "bias"): "bias",
      ("batch_stats", "mean"): "running_mean",
      ("batch_stats", "var"): "running_var",
  }
  out = {}
  for collection, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = [p.key for p in path]
      modules = [re.sub(r"_(\d+)$", r".\1", k) for k in keys[:-1]]
      leaf = np.asarray(leaf)
      leaf = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf  # [kh, kw, in, out] -> [out, in, kh, kw]
      out[".".join(modules + [names[collection, keys[-1]]])] = leaf
  return out


def test_round_trip_through_safetensors(tmp_path):
  variables = _random_variables(ResNet(depth=14, multi_grid=None), seed=3)  # every tensor distinct: a swap would show
  state_dict = _to_torch(variables)
  assert "layer1.0.downsample.0.weight" in state_dict and "layer4.0.bn3.running_var" in state_dict
  state_dict["fc.weight"] = np.zeros((1000, 2048), np.float32)  # ignored, as is num_batches_tracked
  state_dict["fc.bias"] = np.zeros((1000,), np.float32)
  state_dict["bn1.num_batches_tracked"] = np.zeros((), np.int64)
  loaded = torch_resnet_to_flax(load_resnet_state_dict(_save(tmp_path, state_dict)), 14)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_module_prefix_is_stripped(tmp_path, resnet26):
  state_dict, _ = resnet26
  loaded = load_resnet_state_dict(_save(tmp_path, {f"module.{k}": v for k, v in state_dict.items()}))
  assert set(loaded) == set(state_dict)
  np.testing.assert_array_equal(loaded["layer3.1.conv2.weight"], state_dict["layer3.1.conv2.weight"])


def test_wrong_shape_is_reported_by_name(resnet26):
  state_dict = dict(resnet26[0])
  state_dict["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with pytest.raises(
      PretrainedWeightsError,
      match=r"layer2\.0\.conv2\.weight: got \(128, 128, 1, 1\), expected " r"\(128, 128, 3, 3\)",
  ):
    torch_resnet_to_flax(state_dict, 26)


def test_missing_key_is_reported_by_name(resnet26):
  state_dict = dict(resnet26[0])
  del state_dict["layer2.1.bn2.running_var"]
  with pytest.raises(PretrainedWeightsError, match=r"missing keys layer2\.1\.bn2\.running_var; unexpected keys none"):
    torch_resnet_to_flax(state_dict, 26)


def test_unexpected_key_is_reported_by_name(resnet26):
  state_dict = dict(resnet26[0])
  state_dict["layer2.1.se.fc1.weight"] = np.zeros((8, 512, 1, 1), np.float32)
  with pytest.raises(PretrainedWeightsError, match=r"missing keys none; unexpected keys layer2\.1\.se\.fc1\.weight"):
    torch_resnet_to_flax(state_dict, 26)


def test_depth_mismatch_names_both_depths(resnet26):
  with pytest.raises(PretrainedWeightsError, match=r"holds a ResNet-26 .*but the model is a ResNet-50"):
    torch_resnet_to_flax(resnet26[0], 50)


def test_stem_mismatch_is_reported(resnet26):
  with pytest.raises(PretrainedWeightsError, match=r"standard stem, but the model is .*deep stem"):
    torch_resnet_to_flax(resnet26[0], 26, stem="deep")


def test_deep_stem_of_other_widths_is_rejected():
  # timm's resnet*d deep stems are 32-32-64; DeepLab's "beta" stem is 64-64-128.
  manifest, _, _ = fixtures.load_fixture("resnet14_deep")
  narrow = {"conv1.0.weight": [32, 3, 3, 3], "conv1.3.weight": [32, 32, 3, 3], "conv1.6.weight": [64, 32, 3, 3]}
  state_dict = fixtures.fixture_state_dict({"keys": [[k, narrow.get(k, s)] for k, s in manifest["keys"]]})
  with pytest.raises(PretrainedWeightsError, match="deep stem widths 32-32-64 .* is 64-64-128"):
    torch_resnet_to_flax(state_dict, 14, stem="deep")


def test_pth_without_torch_gives_a_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "resnet101.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(PretrainedWeightsError, match="needs torch"):
    load_resnet_state_dict(path)


def test_unknown_format_and_missing_file(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(PretrainedWeightsError, match=r"\.safetensors, \.pth or \.pt"):
    load_resnet_state_dict(tmp_path / "weights.npz")
  with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
    load_resnet_state_dict(tmp_path / "nowhere.safetensors")


def _small_deeplab(depth):
  return DeepLabV3Plus(
      num_classes=3,
      rates=((2, 2),),
      depth=depth,
      multi_grid=None,
      aspp_channels=8,
      low_level_channels=4,
      decoder_channels=8,
  )


def test_load_pretrained_backbone_reproduces_torchvision_and_keeps_heads(tmp_path, resnet26):
  state_dict, ref = resnet26
  model = _small_deeplab(26)
  variables = _random_variables(model, seed=5)
  loaded = load_pretrained_backbone(variables, _save(tmp_path, state_dict), depth=26)
  for collection in ("params", "batch_stats"):
    for name in set(variables[collection]) - {"backbone"}:  # heads untouched
      same = jax.tree_util.tree_map(np.array_equal, loaded[collection][name], variables[collection][name])
      assert all(jax.tree_util.tree_leaves(same))
  backbone = {c: loaded[c]["backbone"] for c in ("params", "batch_stats")}
  np.testing.assert_array_equal(
      backbone["params"]["layer1_0"]["conv2"]["kernel"], state_dict["layer1.0.conv2.weight"].transpose(2, 3, 1, 0)
  )
  feats = jax.jit(partial(ResNet(depth=26, multi_grid=None).apply, train=False))(backbone, ref["input"])
  stage4 = np.asarray(feats["stage4"][..., :64])
  np.testing.assert_allclose(stage4, ref["os32.stage4"], rtol=1e-4, atol=1e-4 * np.abs(ref["os32.stage4"]).max())


def test_load_pretrained_backbone_rejects_other_backbone(tmp_path, resnet26):
  path = _save(tmp_path, resnet26[0])
  model = _small_deeplab(14)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  with pytest.raises(PretrainedWeightsError, match=r"variables only in the model none; only in the file layer1_1/"):
    load_pretrained_backbone(variables, path, depth=26)
  variables = jax.eval_shape(
      partial(_small_deeplab(26).init, train=False), jax.random.key(0), jnp.zeros((1, 33, 33, 3))
  )
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  params["backbone"]["layer2_1"]["conv3"]["kernel"] = jax.ShapeDtypeStruct((1, 1, 128, 256), jnp.float32)
  with pytest.raises(
      PretrainedWeightsError,
      match=r"layer2_1/conv3/kernel: model \(1, 1, 128, 256\), file " r"\(1, 1, 128, 512\)",
  ):
    load_pretrained_backbone({**variables, "params": params}, path, depth=26)


@pytest.mark.parametrize("content", [b"", b"garbage garbage garbage garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{"])
def test_garbage_empty_or_truncated_safetensors_names_the_file(tmp_path, content):
  path = tmp_path / "resnet101.safetensors"
  path.write_bytes(content)
  with pytest.raises(PretrainedWeightsError) as error:
    load_resnet_state_dict(path)
  assert isinstance(error.value, errors.UserError)
  message = str(error.value)
  assert f"cannot read pretrained weights '{path}'" in message and "download or convert it again" in message
  assert "\n" not in message


def test_truncated_real_safetensors_names_the_file(tmp_path, resnet26):
  path = _save(tmp_path, resnet26[0])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(PretrainedWeightsError, match=re.escape(f"cannot read pretrained weights '{path}'")):
    load_resnet_state_dict(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_names_the_file_and_the_key(tmp_path, resnet26, bad):
  state = {k: np.array(v) for k, v in resnet26[0].items()}
  state["layer3.1.bn2.running_var"][[0, 5]] = bad
  path = _save(tmp_path, state)
  with pytest.raises(PretrainedWeightsError) as error:
    load_resnet_state_dict(path)
  assert str(error.value) == (
      f"tensor 'layer3.1.bn2.running_var' of '{path}' holds 2 NaN or infinite values: the "
      "weights are damaged; download or convert them again"
  )


def test_wrong_keys_or_shapes_name_the_file(tmp_path, resnet26):
  state = {k: v for k, v in resnet26[0].items() if k != "layer2.0.conv1.weight"}
  path = _save(tmp_path, state)
  init = partial(_small_deeplab(26).init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  with pytest.raises(
      PretrainedWeightsError,
      match=re.escape(f"pretrained weights '{path}': state dict does not " "match a ResNet-26")
      + ".*missing keys layer2.0.conv1",
  ):
    load_pretrained_backbone(variables, path, depth=26)
  assert issubclass(PretrainedWeightsError, errors.UserError)
