"""Training-step cost of the paper's model on this CPU, with and without the dilated-affinity head.

By default the model is the paper's ResNet-101 DeepLabv3+ (21 classes, output stride 16 to train) with the
affinity head for R = {8, (12, 24), 16} (4 explicit rates, 32 channels), next to plain DeepLabv3+ (no head, rates = ()): the head's
overhead, the paper's "minor extra cost", is printed as a percentage of time, FLOPs and memory. For each crop and
batch it times the real ``dilaff_jax.engine.train_step.train_step`` (forward + backward + cross-replica BatchNorm + SGD update)
under ``jax.pmap(axis_name="batch")`` on 1 CPU device, and prints one Markdown table (progress goes to stderr):

- images/s: batch / the best step time of ``--repeats`` timed steps (the median is printed too), after one untimed
  warm-up step; the two models of a crop and batch are compiled together and stepped in turn (A, B, A, B, ...), so a
  change in the machine's load hits both alike and the time overhead stays a same-moment ratio;
- GFLOPs/step: ``cost_analysis()["flops"]`` of the compiled step that is timed (XLA counts a multiply-add as 2);
- GFLOP/s: those FLOPs / the best step time, and that rate as a share of the matmul rate measured in the same run
  (a float32 ``jnp.dot`` of two 2048 x 2048 matrices, best of ``--repeats`` + 2 calls, once before the first case
  and once after the last; the higher of the two is the reference);
- memory: XLA's ``compiled.memory_analysis()`` of the step, ``argument + output - aliased + temp`` bytes (the state
  is donated, so its outputs reuse the argument buffers): the buffers the step needs at its peak, not the process's
  resident set (``getrusage`` maxima do not go down between cases in one process).

Full run (the paper's crops; ~1-2 min compile per case on CPU, 8 cases; run it on a quiet machine)::

  .venv/bin/python benchmarks/train_step.py

Quick check (a couple of minutes)::

  .venv/bin/python benchmarks/train_step.py --crops 129 --batches 1 --depth 50 --repeats 2

Any config instead of the paper's (its model, classes, affinity rates, crop and per-device batch; ``--crops``,
``--batches`` and ``--depth`` override them), e.g. the demo, with both frameworks on one core and on two::

  .venv/bin/python benchmarks/train_step.py --config=configs/synthetic.py --threads 1
  .venv/bin/python benchmarks/train_step.py --config=configs/synthetic.py --threads 2

``--threads N`` pins the process to its first N cores before JAX starts (XLA:CPU sizes its thread pool from them)
and sets PyTorch's ``set_num_threads(N)``: both frameworks then compute with N threads.

Other flags (defaults): ``--crops 257,513 --batches 1,2 --repeats 5 --depth 101`` (18, 34, 50, 101 or 152)
``--dtypes float32`` (compute dtypes, comma-separated: ``bfloat16`` is the GPU setting). Crops must be 16k + 1
(output stride 16). On one GPU, the side-by-side rows of the paper's model with and without head, in both
precisions (the PyTorch peers come from a separate measuring kit)::

  python benchmarks/train_step.py --crops 513 --batches 16 --dtypes bfloat16,float32

PyTorch peers (``--torch``, default ``auto``: both when ``import torch`` works, none otherwise; torch is never a
requirement of the project): the same-layout DeepLabv3+ without head in PyTorch (``benchmarks/torch_peer.py``), eager
and under ``torch.compile``, stepped in the same rounds as the JAX models and on the same device kind (CUDA when
torch sees a GPU). Their parameter count is checked against the JAX model's before anything is timed. They need a
batch of at least 2 (PyTorch's BatchNorm refuses the image-pooling branch's single value per channel at batch 1).
After the table, the ratios of images/s: the model with head and the plain one against ``torch.compile`` and eager.
Statistics for the loss weights are made up (binomial neighbour counts around π_r ≈ 0.9): they change the loss value,
not its cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from timing import pin_threads, user_error  # noqa: E402  (benchmarks/timing.py; imports nothing heavy)

THREADS = pin_threads(sys.argv[1:]) if __name__ == "__main__" else None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import voc  # noqa: E402
from dilaff_jax.engine import config_checks  # noqa: E402
from dilaff_jax.engine import device_feed  # noqa: E402
from dilaff_jax.method import affinity  # noqa: E402
from dilaff_jax.process import host_memory  # noqa: E402
from dilaff_jax.engine import replicas, run_spec  # noqa: E402
from dilaff_jax.engine import train_state as state_lib  # noqa: E402
from dilaff_jax.engine import train_step as step_lib  # noqa: E402
from dilaff_jax.models import resnet  # noqa: E402
from dilaff_jax.method.neighbour_stats import AffinityStats  # noqa: E402

PAPER_RATES = affinity.expand_rates([8, (12, 24), 16])
GIB = 1024**3


def load_config(spec: str):
  """``configs/NAME.py[:VARIANT]`` as ``dilaff_jax.main`` reads it (``get_config(VARIANT)``), validated."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmarked_config", os.path.join(REPO, path))
  if module_spec is None or not os.path.isfile(os.path.join(REPO, path)):
    user_error(f"--config={spec}: no such config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  config_checks.validate(config, num_devices=1, mode="evaluate")  # no weights file needed: random init here
  return config


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def made_up_stats(rates: affinity.Rates) -> AffinityStats:
  """Plausible ``π_r`` (a little lower for larger rates) and ``freq(n_k, r)`` = Binomial(8, π_r) over k = 0..8."""
  pos = np.array([0.93 - 0.003 * max(r) for r in rates])
  k = np.arange(affinity.NUM_CATEGORIES)
  comb = np.array([math.comb(8, int(i)) for i in k], np.float64)
  freq = comb * pos[:, None] ** k * (1 - pos[:, None]) ** (8 - k)
  return AffinityStats(rates, freq / freq.sum(1, keepdims=True), pos, source="made up (benchmark)")


def paper_config(crop: int, batch: int, depth: int, dtype: str = "float32", base=None):
  """``base`` (default ``configs/voc.py``, the paper's §4.1 setting) at this crop, per-device batch, ResNet depth
  and compute dtype (``model.dtype``; parameters stay float32), random init."""
  config = voc.get_config() if base is None else base.copy_and_resolve_references()
  config.dataset.crop_size = crop
  config.train.batch_size = batch
  config.model.depth = depth
  config.model.dtype = dtype
  config.model.pretrained = "none" if base is not None else ""
  if (crop - 1) % config.model.train_output_stride:
    raise ValueError(
        f"--crops: crop {crop} does not fit output stride {config.model.train_output_stride} "
        f"(needs 16k + 1, e.g. 129, 257, 513)"
    )
  return config


def fake_batch(rng: np.random.Generator, crop: int, batch: int, num_classes: int, ignore: int) -> dict:
  """One device's batch: normalised-looking images and labels in ``0..num_classes-1`` with ~10% ``ignore``."""
  image = rng.normal(size=(1, batch, crop, crop, 3)).astype(np.float32)
  label = rng.integers(0, num_classes, size=(1, batch, crop, crop)).astype(np.int32)
  label[rng.random(label.shape) < 0.1] = ignore
  return {"image": image, "label": label}


@dataclasses.dataclass
class CompiledStep:
  """One model / crop / batch, compiled and ready to step: the state is donated and replaced by every call."""

  crop: int
  batch: int
  dtype: str
  rates: affinity.Rates
  compiled: Any
  state: Any
  data: dict
  rng: jax.Array
  flops: float
  memory_bytes: int
  compile_s: float
  times: list = dataclasses.field(default_factory=list)

  def step(self) -> float:
    """Runs one training step to completion and returns its wall time in seconds."""
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.data, self.rng)
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - start
    loss = float(metrics.unreplicate().loss.compute())
    if not np.isfinite(loss):
      raise RuntimeError(
          f"the benchmarked step (crop {self.crop}, batch {self.batch}, rates {self.rates}) gave "
          f"a non-finite loss ({loss})"
      )
    return elapsed


def compile_step(
    crop: int,
    batch: int,
    rates: affinity.Rates,
    *,
    depth: int = 101,
    dtype: str = "float32",
    seed: int = 0,
    base=None,
) -> CompiledStep:
  """Builds the model, state and a fake batch, and compiles ``step_lib.train_step`` (pmap over 1 device); ``base``:
  the config to start from (default: the paper's)."""
  config = paper_config(crop, batch, depth, dtype, base)
  stats = made_up_stats(rates) if rates else None
  spec = dataclasses.replace(run_spec.derive(config), rates=tuple(rates))
  model = state_lib.build_model(spec, affinity.prior_bias(stats.pos_freq) if rates else None)
  device = jax.local_devices()[0]
  state = replicas.replicate(
      state_lib.create_train_state(spec, model, jax.random.key(seed)), axis_name=state_lib.AXIS, devices=[device]
  )
  step = step_lib.make_train_step(spec, stats, state_lib.learning_rate_schedule(config))
  p_step = jax.pmap(step, axis_name=state_lib.AXIS, in_axes=(0, 0, None), donate_argnums=(0,), devices=[device])
  data = fake_batch(np.random.default_rng(seed), crop, batch, config.dataset.num_classes, config.dataset.ignore_label)
  data = next(device_feed.prefetch_to_device(iter([data]), devices=[device]))  # as training feeds it
  rng = jax.random.key(seed + 1)

  start = time.perf_counter()
  compiled = p_step.lower(state, data, rng).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  memory = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return CompiledStep(
      crop, batch, dtype, tuple(rates), compiled, state, data, rng, float(cost["flops"]), int(memory), compile_s
  )


def time_interleaved(steps: Sequence[CompiledStep], repeats: int) -> None:
  """One untimed warm-up step each, then ``repeats`` rounds of one timed step each, in turn (A, B, A, B, ...), so
  that a change in the machine's load hits every case alike; appends to each ``times``."""
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for s in steps:
    s.step()  # warm-up: first touch of buffers, thread pools
  for i in range(repeats):
    for s in steps:
      s.times.append(s.step())
    log(f"    round {i + 1}/{repeats}: " + ", ".join(f"{s.times[-1]:.2f}s" for s in steps))


def model_steps_per_second(batch_size: int, crop_size: int, depth: int = 101, repeats: int = 2) -> float:
  """Training steps per second (best of ``repeats``) of the paper's model with the affinity head at this
  per-device batch and crop."""
  s = compile_step(crop_size, batch_size, PAPER_RATES, depth=depth)
  time_interleaved([s], repeats)
  return 1.0 / min(s.times)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-``repeats`` float32 ``jnp.dot`` of two ``n x n`` matrices on this device, in GFLOP/s (2n³ flops)."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), jnp.float32)
  b = jax.random.normal(keys[1], (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _percent(new: float, base: float) -> str:
  return f"{100 * (new / base - 1):+.1f}%"


def torch_peers(kinds: Sequence[str], jax_step: CompiledStep, depth: int, seed: int = 0, base=None) -> list:
  """``(name, TorchStep)`` for each of ``kinds`` (``eager``, ``compile``) at the JAX step's crop, batch and dtype,
  on the JAX step's own fake batch, with the layout of ``base``'s model (default: the paper's); a RuntimeError when
  the PyTorch network's parameter count differs from the JAX no-head model's (a layout drift would make the
  comparison wrong)."""
  import torch_peer  # pylint: disable=import-outside-toplevel  # optional: needs torch

  if THREADS is not None:
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(THREADS)
  config = paper_config(jax_step.crop, jax_step.batch, depth, jax_step.dtype, base)
  m = config.model
  if m.separable or m.stem != "standard":
    raise RuntimeError("the PyTorch peer has the standard stem and plain convolutions only")
  kind, stage_sizes = resnet.layout(depth)
  schedule = resnet.unit_schedule(stage_sizes, config.model.train_output_stride, config.model.multi_grid)
  data = fake_batch(
      np.random.default_rng(seed),
      jax_step.crop,
      jax_step.batch,
      config.dataset.num_classes,
      config.dataset.ignore_label,
  )
  jax_count = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(jax_step.state.params))  # [devices, ...]
  unit_kind = "basic" if kind == "basic" else "bottleneck"
  peers = []
  for kind in kinds:
    step = torch_peer.make_step(
        schedule,
        config.dataset.num_classes,
        data["image"][0],
        data["label"][0],
        dtype=jax_step.dtype,
        compiled=kind == "compile",
        kind=unit_kind,
        aspp_rates=tuple(m.get("aspp_rates", (6, 12, 18))),
        aspp_channels=m.aspp_channels,
        low_level_channels=m.low_level_channels,
        decoder_channels=m.decoder_channels,
        dropout_rate=m.dropout_rate,
    )
    count = torch_peer.parameter_count(step.model)
    if count != jax_count:
      raise RuntimeError(f"the PyTorch peer has {count:,} parameters, the JAX model {jax_count:,}: layouts differ")
    peers.append((f"PyTorch {'torch.compile' if kind == 'compile' else 'eager'} (no head)", step))
  return peers


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
      "--config",
      default="",
      help="a config file (optionally :VARIANT), e.g. configs/synthetic.py for the demo: its model, classes, rates, "
      "crop and batch (--crops, --batches, --depth override them); default: the paper's configs/voc.py",
  )
  parser.add_argument("--threads", type=int, default=None, help="cores for both frameworks (default: all)")
  parser.add_argument("--crops", default=None, help="comma-separated square crops (16k + 1); default 257,513")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes (one device); default 1,2")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (best and median reported)")
  parser.add_argument(
      "--dtypes",
      default="float32",
      help="comma-separated compute dtypes (model.dtype): float32, bfloat16 (GPUs), float16; params stay float32",
  )
  parser.add_argument(
      "--depth",
      type=int,
      default=None,
      choices=[18, 34, 50, 101, 152],
      help="ResNet depth (default: the config's; the paper's 101); multi-grid needs one rate per unit of the last "
      "stage (the paper's (1, 2, 4): 50, 101, 152)",
  )
  parser.add_argument(
      "--torch",
      default="auto",
      help="PyTorch peers: auto (eager,compile when torch imports, else none), none, or a comma-separated subset "
      "of eager,compile",
  )
  args = parser.parse_args()
  host_memory.reuse_freed_memory()  # as the training job does (benchmarks/host_memory.py measures what it changes)
  if args.torch == "auto":
    if importlib.util.find_spec("torch") is None:
      torch_kinds = []
      log("torch is not installed: no PyTorch rows (--torch=auto)")
    else:
      torch_kinds = ["eager", "compile"]
  else:
    torch_kinds = [] if args.torch == "none" else [k.strip() for k in args.torch.split(",")]
    if not set(torch_kinds) <= {"eager", "compile"}:
      parser.error(f"--torch={args.torch}: expected auto, none, or a subset of eager,compile")
  base, head_rates = None, PAPER_RATES
  if args.config:
    base = load_config(args.config)
    head_rates = run_spec.derive(base).rates if base.affinity.enabled else ()
    if not head_rates:
      parser.error(f"--config={args.config}: the config has no affinity head to compare")
  depth = args.depth or (int(base.model.depth) if base is not None else 101)
  crops = [int(c) for c in (args.crops or (str(base.dataset.crop_size) if base else "257,513")).split(",")]
  batches = [int(b) for b in (args.batches or (str(base.train.batch_size) if base else "1,2")).split(",")]
  dtypes = [d.strip() for d in args.dtypes.split(",")]
  if not set(dtypes) <= {"float32", "bfloat16", "float16"}:
    parser.error(f"--dtypes={args.dtypes}: expected float32, bfloat16 or float16")
  for crop in crops:
    paper_config(crop, 1, depth, base=base)  # fail fast on a bad crop
  if args.repeats < 1 or min(batches) < 1:
    parser.error("--repeats and --batches must be >= 1")

  log("matmul reference (2048 x 2048 float32) ...")
  matmul_before = matmul_gflops(repeats=args.repeats + 2)
  pairs = []
  t0 = time.perf_counter()
  cases = [(crop, batch, dtype) for dtype in dtypes for crop in crops for batch in batches]
  for crop, batch, dtype in cases:
    pair = []
    for name, rates in (("DeepLabv3+ (no head)", ()), ("+ affinity head", head_rates)):
      log(
          f"[{len(pairs) * 2 + len(pair) + 1}/{2 * len(cases)}] ResNet-{depth} {name}, {dtype}, "
          f"crop {crop}, batch {batch}: compiling ({time.perf_counter() - t0:.0f}s so far)"
      )
      s = compile_step(crop, batch, rates, depth=depth, dtype=dtype, base=base)
      log(f"    compiled in {s.compile_s:.1f}s: {s.flops / 1e9:.1f} GFLOPs, {s.memory_bytes / GIB:.2f} GiB")
      pair.append((name, s))
    if torch_kinds and batch < 2:
      log("    no PyTorch rows at batch 1 (its BatchNorm needs 2 values per channel in the image-pooling branch)")
    elif torch_kinds:
      log(f"    PyTorch peers ({', '.join(torch_kinds)}): building and compiling")
      pair += torch_peers(torch_kinds, pair[0][1], depth, base=base)
    log(f"    timing all {len(pair)}, interleaved: {args.repeats} rounds after a warm-up")
    time_interleaved([s for _, s in pair], args.repeats)
    pairs.append(pair)
    for _, s in pair:  # free the states before the next (larger) case
      if hasattr(s, "free"):
        s.free()
      else:
        s.state = s.compiled = s.data = None
  matmul_after = matmul_gflops(repeats=args.repeats + 2)
  matmul = max(matmul_before, matmul_after)

  num_classes = base.dataset.num_classes if base is not None else 21
  print(
      f"Training step of ResNet-{depth} DeepLabv3+ ({args.config or 'configs/voc.py'}: {num_classes} classes, "
      f"output stride 16, SGD momentum; compute dtype per row, float32 parameters), "
      f"affinity head R = {list(head_rates)} ({len(head_rates)} explicit rates); "
      f"{'every allowed core' if THREADS is None else f'{THREADS} thread(s) for both frameworks'}; `jax.pmap` on 1 "
      f"{jax.devices()[0].platform.upper()} device ({jax.devices()[0].device_kind}); jax {jax.__version__}; "
      f"host {_cpu_name()}, {os.cpu_count()} "
      f"cores.\nStep time: best (and median) of {args.repeats} steps after a warm-up, the two models timed in "
      f"turn; images/s, GFLOP/s and the time overhead use the best. FLOPs: XLA `cost_analysis()` of the timed "
      f"step. Memory: XLA `memory_analysis()` of the step, arguments + outputs - donated + temporaries.\n"
      f"Matmul reference (float32 2048 x 2048 `jnp.dot`, best of {args.repeats + 2}): {matmul_before:.1f} "
      f"GFLOP/s before the cases, {matmul_after:.1f} GFLOP/s after; % of matmul uses the higher.\n"
  )
  print(
      "| dtype | crop | batch | model | compile s | step s (median) | images/s | GFLOPs/step | GFLOP/s | % of matmul "
      "| memory GiB | head overhead: time | FLOPs | memory |"
  )
  print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for pair in pairs:
    base = pair[0][1]
    for name, s in pair:
      best = min(s.times)
      flops = base.flops if name.startswith("PyTorch") else s.flops  # same layout as the plain JAX model
      achieved = flops / best / 1e9
      overhead = (
          f"{_percent(best, min(base.times))} | {_percent(s.flops, base.flops)} | "
          f"{_percent(s.memory_bytes, base.memory_bytes)}"
          if name == "+ affinity head"
          else "— | — | —"
      )
      memory = f"{s.memory_bytes / GIB:.2f}" if s.memory_bytes else "—"
      print(
          f"| {s.dtype} | {s.crop} | {s.batch} | {name} | {s.compile_s:.0f} | {best:.2f} ({np.median(s.times):.2f}) | "
          f"{s.batch / best:.3f} | {flops / 1e9:.1f} | {achieved:.1f} | {100 * achieved / matmul:.0f}% | "
          f"{memory} | {overhead} |",
          flush=True,
      )
  peered = [pair for pair in pairs if len(pair) > 2]
  if peered:
    print(
        "\nPyTorch rows: FLOPs are the plain JAX model's (same layout); memory is "
        "`torch.cuda.max_memory_allocated` on a GPU, not measured on a CPU.\n\n"
        "Ratios of images/s in the same rounds (> 1: this project is faster):\n"
    )
    peers = [name for name, _ in peered[0][2:]]
    print("| dtype | crop | batch | " + " | ".join(f"{m} / {p}" for m in ("with head", "plain") for p in peers) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * (2 * len(peers)))
    for pair in peered:
      best = {name: min(s.times) for name, s in pair}
      s = pair[0][1]
      cells = [f"{best[p] / best[m]:.2f}x" for m in ("+ affinity head", "DeepLabv3+ (no head)") for p in peers]
      print(f"| {s.dtype} | {s.crop} | {s.batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
