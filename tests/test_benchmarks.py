"""The benchmarks' own logic: what `benchmarks/conv_kernels.py` records and times (run without torch)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import conv_kernels  # noqa: E402
from configs import synthetic  # noqa: E402


def test_conv_kernels_records_every_convolution_of_the_step_once_with_its_count():
  config = synthetic.get_config("tiny")
  config.model.pretrained = "none"
  calls = conv_kernels.record_convs(config)
  # the demo's ResNet-18 at output stride 16: stem, 8 basic units (16 3x3 convolutions, 3 projection shortcuts),
  # ASPP (1x1, three atrous, image pooling, projection), decoder (low-level 1x1, two 3x3), classifier, affinity head
  assert sum(c.count for c in calls) == 1 + 16 + 3 + 6 + 3 + 2 == 31
  stem = calls[0]
  b, crop = config.train.batch_size, config.dataset.crop_size
  assert stem.in_shape == (b, crop, crop, 3) and not stem.input_grad and stem.passes == 2
  assert stem.out_shape == (b, (crop + 1) // 2, (crop + 1) // 2, 64)  # 7x7, stride 2, padding 3
  assert all(c.out_shape[-1] == c.module.features and c.out_shape[0] == b for c in calls)
  assert all(c.input_grad for c in calls[1:])
  # layer1's 3x3 convolution runs 4 times on the same input shape: one case, counted 4 times
  layer1 = [c for c in calls if c.module.kernel_size == (3, 3) and c.in_shape[-1] == 64 and c.count == 4]
  assert len(layer1) == 1
  kh, kw = layer1[0].module.kernel_size
  assert layer1[0].macs == int(np.prod(layer1[0].out_shape)) * kh * kw * 64
  affinity_head = calls[-1]
  assert affinity_head.module.features == 8 * 4 and affinity_head.module.kernel_size == (1, 1)


def test_conv_kernels_jax_case_computes_forward_and_both_gradients():
  config = synthetic.get_config("tiny")
  config.model.pretrained = "none"
  call = next(c for c in conv_kernels.record_convs(config) if c.module.kernel_size == (3, 3) and c.input_grad)
  value, (grads, dx) = conv_kernels.jax_case(call)()
  assert dx.shape == call.in_shape and np.isfinite(float(value))
  kernel = grads["params"]["kernel"]
  # the kernel's gradient of <conv(x, w), dy> is the correlation of x and dy: check one entry by hand
  rng = np.random.default_rng(0)
  x = rng.normal(size=call.in_shape)
  dy = rng.normal(size=call.out_shape)
  pad = call.module.padding[0][0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = call.out_shape[1:3]
  want = np.einsum("bhwc,bhwo->co", xp[:, 0:h, 0:w], dy)[0, 0]  # tap (0, 0), channel 0 -> 0
  np.testing.assert_allclose(float(kernel[0, 0, 0, 0]), want, rtol=1e-4)


def test_a_bad_benchmark_argument_is_one_error_line_and_exit_status_2(capsys):
  import timing

  for argv, named in ((["--threads", "0"], "--threads='0'"), (["--threads=999"], "--threads=999")):
    with pytest.raises(SystemExit) as exit_info:
      timing.pin_threads(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {named}:")
  assert timing.pin_threads(["--repeats", "3"]) is None  # no --threads: every allowed core, nothing pinned
