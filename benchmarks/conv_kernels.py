"""The training step's convolutions alone, in JAX and in PyTorch, timed side by side in one process.

Where does the demo's step lose to PyTorch's? This benchmark separates the convolution kernels from the rest. It
records every ``nn.Conv`` that the config's model calls in a training forward pass (input shape, kernel, stride,
padding, dilation, groups), then times each distinct call forward and backward (the input's gradient and the
kernel's, as training needs them; the stem's input is the image, so only its kernel gradient) in both frameworks:

- JAX: the recorded module itself (the project's convolution, ``models/atrous.conv_general_dilated``, which runs
  an atrous convolution tap by tap on the CPU where padding would take >= 10% of the work), jitted;
- PyTorch: ``nn.Conv2d`` with the same shapes in channels-last layout (oneDNN on a CPU), as ``torch_peer`` runs.

Each distinct call is one case, both frameworks in turn in every round (``timing.interleaved``). Printed per case:
how many times the step calls it, the best (median) milliseconds of forward + backward in each framework, their
ratio, each framework's GFLOP/s (``2 · outputs · kh · kw · cin / groups`` multiply-adds per pass, three passes
with the input's gradient, two without; padding taps are not subtracted), and at the end the totals weighted by
the calls' counts: the step's convolution time in each framework, to set beside ``train_step.py``'s whole steps.

  .venv/bin/python benchmarks/conv_kernels.py --config=configs/synthetic.py --threads 1 [--repeats 7]

Needs torch (optional, never a dependency of the project): without it only the JAX column is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from timing import pin_threads  # benchmarks/timing.py (imports nothing heavy: threads are pinned before JAX starts)

THREADS = pin_threads(sys.argv[1:]) if __name__ == "__main__" else None

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dilaff_jax.engine import run_spec  # noqa: E402
from dilaff_jax.engine import train_state as state_lib  # noqa: E402
from dilaff_jax.method import affinity  # noqa: E402
from dilaff_jax.models import probes  # noqa: E402
from dilaff_jax.process import host_memory  # noqa: E402
from timing import interleaved  # noqa: E402
from train_step import load_config, log, made_up_stats  # noqa: E402


@dataclasses.dataclass
class ConvCall:
  """One distinct convolution of the step: the module (unbound copy), its input shape and how often it runs."""

  module: nn.Conv
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  input_grad: bool
  count: int = 1

  @property
  def macs(self) -> int:
    kh, kw = self.module.kernel_size
    return int(np.prod(self.out_shape)) * kh * kw * self.in_shape[-1] // self.module.feature_group_count

  @property
  def passes(self) -> int:
    return 3 if self.input_grad else 2

  def label(self) -> str:
    m = self.module
    kh, kw = m.kernel_size
    dil = _pair(m.kernel_dilation)
    stride = _pair(m.strides)
    extra = "".join(
        [
            f" /{stride[0]}" if stride != (1, 1) else "",
            f" rate {dil[0]}" if dil != (1, 1) else "",
            f" groups {m.feature_group_count}" if m.feature_group_count != 1 else "",
        ]
    )
    n, h, w, c = self.in_shape
    return f"{kh}x{kw} {c}->{m.features}{extra} on {n}x{h}x{w}"


def _pair(value) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  return (value, value) if isinstance(value, int) else tuple(value)


def record_convs(config) -> list[ConvCall]:
  """Every ``nn.Conv`` of one training forward pass of ``config``'s model (with its affinity head when the config
  has rates), grouped by module settings and input shape, in first-call order."""
  spec = run_spec.derive(config)
  bias = affinity.prior_bias(made_up_stats(spec.rates).pos_freq) if spec.rates else None
  model = state_lib.build_model(spec, bias, axis_name=None)
  crop, batch = config.dataset.crop_size, config.train.batch_size
  images = jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32)
  calls: dict[Any, ConvCall] = {}
  recorded = probes.recorded_convs(
      model,
      images,
      train=True,
      output_stride=config.model.train_output_stride,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(1)},
  )
  for module, in_shape, out_shape in recorded:
    key = (repr(module), in_shape)
    if key in calls:
      calls[key].count += 1
    else:
      calls[key] = ConvCall(module, in_shape, out_shape, input_grad=in_shape != images.shape)
  return list(calls.values())


def jax_case(call: ConvCall, seed: int = 0):
  """A zero-argument callable: the module's forward and backward (kernel and, unless the input is the image,
  input gradients) on fixed random inputs."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=call.in_shape), jnp.float32)
  dy = jnp.asarray(rng.normal(size=call.out_shape), jnp.float32)
  params = call.module.init(jax.random.key(seed), x)

  def loss(params, x):
    return jnp.vdot(call.module.apply(params, x), dy)

  # value_and_grad: the loss is linear in the output, so with the gradients alone XLA would drop the forward pass
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if call.input_grad else 0))
  return lambda: step(params, x)


def torch_case(call: ConvCall, seed: int = 0):
  """The same convolution as ``nn.Conv2d`` in channels-last layout (symmetric padding that gives JAX's output
  size), forward and backward; a RuntimeError when no symmetric padding gives that size."""
  import torch  # pylint: disable=import-outside-toplevel  # optional

  m = call.module
  n, h, w, cin = call.in_shape
  (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, _pair(m.strides), _pair(m.kernel_dilation)
  pads = []
  for size, out, k, s, d in ((h, call.out_shape[1], kh, sh, dh), (w, call.out_shape[2], kw, sw, dw)):
    fit = [p for p in range(d * (k - 1) + 1) if (size + 2 * p - d * (k - 1) - 1) // s + 1 == out]
    if not fit:
      raise RuntimeError(f"{call.label()}: no symmetric padding gives JAX's output size {out}")
    pads.append(fit[len(fit) // 2])
  torch.manual_seed(seed)
  conv = torch.nn.Conv2d(
      cin, m.features, (kh, kw), (sh, sw), tuple(pads), (dh, dw), m.feature_group_count, bias=m.use_bias
  ).to(memory_format=torch.channels_last)
  x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(call.input_grad)
  dy = torch.randn(call.out_shape[0], call.out_shape[3], *call.out_shape[1:3]).contiguous(
      memory_format=torch.channels_last
  )

  def step():
    conv.zero_grad(set_to_none=True)
    x.grad = None
    conv(x).backward(dy)

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/synthetic.py", help="configs/NAME.py[:VARIANT] (default: the demo)")
  parser.add_argument("--threads", type=int, default=None, help="cores for both frameworks (default: all)")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (best and median printed)")
  args = parser.parse_args()
  host_memory.reuse_freed_memory()  # as training runs
  config = load_config(args.config)
  calls = record_convs(config)
  have_torch = importlib.util.find_spec("torch") is not None
  if have_torch:
    import torch  # pylint: disable=import-outside-toplevel

    if THREADS is not None:
      torch.set_num_threads(THREADS)
  else:
    log("torch is not installed: JAX column only")
  log(f"{len(calls)} distinct convolutions, {sum(c.count for c in calls)} calls per step")
  cases = {}
  for i, call in enumerate(calls):
    cases[f"jax {i}"] = jax_case(call)
    if have_torch:
      cases[f"torch {i}"] = torch_case(call)
  times = interleaved(cases, args.repeats, log=None)
  med = lambda key: statistics.median(times[key])
  print(
      f"\nConvolutions of `{args.config}`'s training step, forward + backward, threads: {THREADS or 'all'}, "
      f"best (median) of {args.repeats} interleaved rounds, ms\n"
  )
  head = "| convolution | calls | JAX ms | JAX GFLOP/s |"
  if have_torch:
    head += " PyTorch ms | PyTorch GFLOP/s | JAX / PyTorch time |"
  print(head)
  print("| --- " + "| ---: " * (head.count("|") - 2) + "|")
  total = {"jax": [0.0, 0.0], "torch": [0.0, 0.0]}
  for i, call in enumerate(calls):
    flops = 2 * call.macs * call.passes
    j = times[f"jax {i}"]
    total["jax"][0] += call.count * min(j)
    total["jax"][1] += call.count * med(f"jax {i}")
    row = f"| {call.label()} | {call.count} | {1e3 * min(j):.2f} ({1e3 * med(f'jax {i}'):.2f}) | {flops / min(j) / 1e9:.0f} |"
    if have_torch:
      t = times[f"torch {i}"]
      total["torch"][0] += call.count * min(t)
      total["torch"][1] += call.count * med(f"torch {i}")
      row += (
          f" {1e3 * min(t):.2f} ({1e3 * med(f'torch {i}'):.2f}) | {flops / min(t) / 1e9:.0f} | {min(j) / min(t):.2f} |"
      )
    print(row)
  all_flops = sum(2 * c.macs * c.passes * c.count for c in calls)
  row = f"| **all, weighted by calls** | {sum(c.count for c in calls)} | {1e3 * total['jax'][0]:.0f} ({1e3 * total['jax'][1]:.0f}) | {all_flops / total['jax'][0] / 1e9:.0f} |"
  if have_torch:
    row += (
        f" {1e3 * total['torch'][0]:.0f} ({1e3 * total['torch'][1]:.0f}) | {all_flops / total['torch'][0] / 1e9:.0f} |"
        f" {total['jax'][0] / total['torch'][0]:.2f} |"
    )
  print(row)
  print(
      f"\n{all_flops / 1e9:.1f} GFLOPs of convolution per step (padding taps included); JAX {jax.__version__}"
      + (f", torch {torch.__version__}" if have_torch else "")
  )


if __name__ == "__main__":
  main()
