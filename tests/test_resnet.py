"""The atrous ResNet backbone: torchvision's parameter counts, rate schedule, and numerical parity with torchvision.

The parity fixtures were made by tests/fixtures/make_torch_resnet_fixture.py with torch 2.14.1 / torchvision 0.29.1.
"""

import importlib.util
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_probes import conv_calls

from dilaff_jax.models.resnet import ResNet, Unit, resnet_param_count, unit_schedule
from dilaff_jax.models.pretrained import torch_resnet_to_flax

_spec = importlib.util.spec_from_file_location(
    "make_torch_resnet_fixture", Path(__file__).parent / "fixtures" / "make_torch_resnet_fixture.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

R101 = (3, 4, 23, 3)


def _assert_close(got, ref, rtol=1e-4):
  """Agreement to `rtol` relative to the reference's scale (elementwise and in norm)."""
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
  assert np.linalg.norm(got - ref) <= rtol * np.linalg.norm(ref)


# torchvision's numbers: sum(p.numel() for name, p in resnetN().named_parameters() if not name.startswith("fc."))
@pytest.mark.parametrize(
    "depth, count", [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160), (152, 58_143_808)]
)
def test_param_count_equals_torchvision(depth, count):
  assert resnet_param_count(depth) == count


def test_deep_stem_param_count():
  # 64-64-128 stem instead of the 7x7: -7*7*3*64 + 3*3*(3*64 + 64*64 + 64*128) + BN(64+64)*2 + BN(128 - 64)*2,
  # and layer1_0 takes 128 channels: + (128 - 64) * (64 + 256) for its conv1 and downsample conv.
  extra = -7 * 7 * 3 * 64 + 9 * (3 * 64 + 64 * 64 + 64 * 128) + 2 * (64 + 64) + 2 * 64 + 64 * (64 + 256)
  assert resnet_param_count(101, "deep") == 42_500_160 + extra


def test_unit_schedule_resnet101():
  plain = lambda n, stride=1: (Unit(stride, 1, 1),) + (Unit(1, 1, 1),) * (n - 1)  # noqa: E731
  os32 = unit_schedule(R101, 32, (1, 2, 4))
  assert os32 == (plain(3), plain(4, 2), plain(23, 2), plain(3, 2))  # multi-grid only acts on a dilated stage
  os16 = unit_schedule(R101, 16, (1, 2, 4))
  assert os16[:3] == os32[:3]
  assert os16[3] == (Unit(1, 2, 2), Unit(1, 4, 4), Unit(1, 8, 8))  # DeepLabv3: 2 * (1, 2, 4)
  os8 = unit_schedule(R101, 8, (1, 2, 4))
  assert os8[:2] == os32[:2]
  assert os8[2] == (Unit(1, 1, 2),) + (Unit(1, 2, 2),) * 22
  assert os8[3] == (Unit(1, 4, 4), Unit(1, 8, 8), Unit(1, 16, 16))
  # torchvision's replace_stride_with_dilation: the unit giving up its stride keeps the incoming rate.
  assert unit_schedule(R101, 8, None)[3] == (Unit(1, 2, 4), Unit(1, 4, 4), Unit(1, 4, 4))
  assert unit_schedule(R101, 16, None)[3] == (Unit(1, 1, 2), Unit(1, 2, 2), Unit(1, 2, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stage_sizes=R101, output_stride=4, multi_grid=None), "output_stride"),
        (dict(stage_sizes=R101, output_stride=16, multi_grid=(1, 2)), "multi_grid"),
        (dict(stage_sizes=R101, output_stride=16, multi_grid=(1, 0, 2)), "multi_grid"),
        (dict(stage_sizes=(2, 2, 2, 2), output_stride=16, multi_grid=(1, 2, 4)), "2 units"),
    ],
)
def test_unit_schedule_rejects_bad_input(kwargs, message):
  with pytest.raises(ValueError, match=message):
    unit_schedule(**kwargs)


@pytest.mark.parametrize("depth, stem, message", [(20, "standard", "depth 20"), (50, "wide", "stem 'wide'")])
def test_resnet_rejects_unknown_depth_and_stem(depth, stem, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(
        partial(ResNet(depth=depth, stem=stem).init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32),
    )


@pytest.mark.parametrize(
    "output_stride, sizes", [(32, (129, 129, 65, 33, 17)), (16, (129, 129, 65, 33, 33)), (8, (129, 129, 65, 65, 65))]
)
def test_feature_sizes_follow_pytorch_arithmetic(output_stride, sizes):
  model = ResNet(depth=101)
  images = jax.ShapeDtypeStruct((1, 513, 513, 3), jnp.float32)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
  feats = jax.eval_shape(partial(model.apply, train=False, output_stride=output_stride), variables, images)
  names = ("stem", "stage1", "stage2", "stage3", "stage4")
  channels = (64, 256, 512, 1024, 2048)
  assert {k: feats[k].shape for k in names} == {k: (1, s, s, c) for k, s, c in zip(names, sizes, channels)}


@pytest.fixture(scope="module")
def resnet26():
  _, state_dict, outputs = fixtures.load_fixture("resnet26")
  return torch_resnet_to_flax(state_dict, 26), outputs


def _features(variables, image, output_stride, **kwargs):
  model = ResNet(depth=kwargs.pop("depth", 26), **kwargs)
  return jax.jit(partial(model.apply, train=False, output_stride=output_stride))(variables, image)


def test_parity_with_torchvision_at_output_stride_32(resnet26):
  variables, ref = resnet26
  feats = _features(variables, ref["input"], 32, multi_grid=None)
  for name in ("stem", "stage1", "stage2", "stage3", "stage4"):
    _assert_close(feats[name][..., :64], ref[f"os32.{name}"])


def test_parity_with_torchvision_replace_stride_with_dilation(resnet26):
  # torchvision ResNet(..., replace_stride_with_dilation=[False, True, True]) is our output stride 8.
  variables, ref = resnet26
  feats = _features(variables, ref["input"], 8, multi_grid=None)
  assert feats["stage4"].shape[1:3] == (13, 15)
  for name in ("stage3", "stage4"):
    _assert_close(feats[name][..., :64], ref[f"os8.{name}"])


def test_parity_with_torchvision_multi_grid(resnet26):
  # Reference: torchvision at OS 16 with layer4's 3x3 dilations set by hand to 2 * (1, 2).
  variables, ref = resnet26
  multi_grid = _features(variables, ref["input"], 16, multi_grid=(1, 2))["stage4"][..., :64]
  _assert_close(multi_grid, ref["os16_mg12.stage4"])
  # The fixture tells rates apart: torchvision's own OS-16 rates (1, 2) do not reproduce it.
  plain = _features(variables, ref["input"], 16, multi_grid=None)["stage4"][..., :64]
  assert np.abs(plain - ref["os16_mg12.stage4"]).max() > 0.1 * np.abs(ref["os16_mg12.stage4"]).max()


def test_parity_with_timm_style_deep_stem():
  _, state_dict, ref = fixtures.load_fixture("resnet14_deep")
  variables = torch_resnet_to_flax(state_dict, 14, stem="deep")
  feats = _features(variables, ref["input"], 32, depth=14, stem="deep", multi_grid=None)
  for name in ("stage1", "stage4"):
    _assert_close(feats[name][..., :64], ref[f"os32.{name}"])


def test_parity_with_torchvision_resnet18_basic_units():
  _, state_dict, ref = fixtures.load_fixture("resnet18")
  feats = _features(torch_resnet_to_flax(state_dict, 18), ref["input"], 32, depth=18, multi_grid=None)
  for name in ("stage1", "stage2", "stage3", "stage4"):
    _assert_close(feats[name][..., :64], ref[f"os32.{name}"])


def test_bfloat16_compute_keeps_float32_params(resnet26):
  variables, ref = resnet26
  model = ResNet(depth=26, multi_grid=None, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), ref["input"])
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  feats = jax.jit(partial(model.apply, train=False))(variables, ref["input"])
  assert feats["stage4"].dtype == jnp.bfloat16
  got = np.asarray(feats["stage4"][..., :64], np.float32)
  assert np.linalg.norm(got - ref["os32.stage4"]) <= 3e-2 * np.linalg.norm(ref["os32.stage4"])


def test_basic_units_dilate_their_second_conv_at_the_new_rate():
  # ResNet-18 at OS 8: layer3's first unit reads the stride-8 grid (conv1 rate 1), its conv2 the dilated one (2).
  model = ResNet(depth=18, multi_grid=(1, 2))
  dilations = [dilation[0] for _, dilation in conv_calls(model, jnp.zeros((1, 33, 33, 3)), output_stride=8)]
  # stem, layer1 (2 units x 2), layer2 (2 x 2 + downsample), layer3, layer4 (multi-grid 4 * (1, 2)).
  assert dilations == [1] + [1] * 4 + [1, 1, 1, 1, 1] + [1, 2, 1, 2, 2] + [4, 4, 1, 8, 8]
