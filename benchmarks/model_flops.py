"""FLOPs and parameters of the paper's model (ResNet-101 DeepLabv3+, 21 classes) at 513x513, output stride 16 and 8.

For each stem (torchvision's 7x7, DeepLab's 3x3 "beta") and output stride, with and without the affinity head
(R = {8, (12, 24), 16}: 4 explicit rates, 32 channels), prints a markdown table (the one in
dilaff_jax/models/README.md) with:

- XLA flops: `jax.jit(forward).lower(...).compile().cost_analysis()["flops"]` of one eval-mode forward, batch 1.
  XLA counts a multiply-add as 2 flops and skips kernel taps that fall into the zero padding, which matters for
  the large atrous rates (ASPP's 36 on a 65x65 map at OS 8);
- naive multiply-adds: output elements x kernel taps x input channels of every convolution, padding taps included
  (the usual way papers count, e.g. DeepLabv3+'s Table 3), from the traced program;
- trainable parameters (BatchNorm running statistics excluded).

  .venv/bin/python benchmarks/model_flops.py [--size 513] [--classes 21] [--stems standard deep]

Abstract shapes only (`jax.eval_shape`): nothing is initialised or run; each case compiles once (~40 s in all).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dilaff_jax.models.deeplab import DeepLabV3Plus

PAPER_RATES = ((8, 8), (12, 24), (24, 12), (16, 16))  # R = {8, (12, 24), 16} expanded (docs/conventions.md §1)


def naive_multiply_adds(jaxpr) -> int:
  """Sum over convolutions of output elements x kernel taps x input channels per group (padding included)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape  # HWIO (flax)
      out = eqn.outvars[0].aval.shape
      total += int(np.prod(out)) * kernel[0] * kernel[1] * kernel[2]
    for param in eqn.params.values():  # descend into pjit / custom_jvp sub-programs
      inner = getattr(param, "jaxpr", None)
      if inner is not None:
        total += naive_multiply_adds(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return total


def measure(model: DeepLabV3Plus, size: int, output_stride: int) -> dict:
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
  forward = partial(model.apply, train=False, output_stride=output_stride)
  start = time.perf_counter()
  cost = jax.jit(forward).lower(variables, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "xla_flops": float(cost["flops"]),
      "naive_madds": naive_multiply_adds(jax.make_jaxpr(forward)(variables, images).jaxpr),
      "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"]))),
      "compile_s": time.perf_counter() - start,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=513)
  parser.add_argument("--classes", type=int, default=21)
  parser.add_argument("--stems", nargs="+", default=["standard", "deep"], choices=["standard", "deep"])
  args = parser.parse_args()
  print(
      f"ResNet-101 DeepLabv3+, {args.classes} classes, {args.size}x{args.size}, batch 1, eval mode; "
      f"jax {jax.__version__} on {jax.devices()[0].platform}\n"
  )
  print("| stem | model | OS | XLA GFLOPs | XLA multiply-adds (B) | naive multiply-adds (B) | parameters |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for stem in args.stems:
    for output_stride in (16, 8):
      for label, rates in (("DeepLabv3+ (baseline)", ()), ("+ affinity head (32 ch.)", PAPER_RATES)):
        model = DeepLabV3Plus(num_classes=args.classes, rates=rates, stem=stem)
        r = measure(model, args.size, output_stride)
        print(
            f"| {stem} | {label} | {output_stride} | {r['xla_flops'] / 1e9:.2f} | "
            f"{r['xla_flops'] / 2e9:.2f} | {r['naive_madds'] / 1e9:.2f} | {r['params']:,} |",
            flush=True,
        )


if __name__ == "__main__":
  main()
