"""The train state and what builds it: the DeepLabv3+ of ``config.model``, the optimizer and its schedule, the
initial variables (with the ImageNet backbone), and the restore of a workdir's checkpoint into that structure.

Training, evaluation, prediction and export all build their model and restore their checkpoints here, so that a
model hyper-parameter is read in one place (:func:`build_model`).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from dilaff_jax.engine import checkpoints, config_checks
from dilaff_jax.engine.run_spec import RunSpec
from dilaff_jax.method import structure_losses
from dilaff_jax.models import pretrained
from dilaff_jax.models.deeplab import DeepLabV3Plus

AXIS = "batch"  # the pmap axis of training and evaluation (cross-replica BatchNorm, metric sums)
AAF_PARAMS = "aaf_weights"  # params key of AAF's raw adversarial size weights [2, num_classes, num_sizes]


class TrainState(train_state.TrainState):
  batch_stats: Any


def compute_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def build_model(
    spec: RunSpec,
    affinity_bias: Sequence[float] | None = None,
    axis_name: str | None = AXIS,
) -> DeepLabV3Plus:
  """The DeepLabv3+ of ``spec.config.model``; with ``spec.rates`` it has the affinity head (bias from
  ``prior_bias``).

  Every ``config.model`` key named like a :class:`DeepLabV3Plus` field is passed to it: a new model hyper-parameter
  is a field of the module and a key of ``configs/default.py`` (plus its check in ``config_checks``)."""
  config = spec.config
  config_checks.check_model_keys(config)
  fields = config_checks.model_fields()
  kwargs = {k: v for k, v in config.model.items() if k in fields}
  kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  if kwargs.get("multi_grid") is not None:
    kwargs["multi_grid"] = tuple(kwargs["multi_grid"])
  return DeepLabV3Plus(
      num_classes=config.dataset.num_classes,
      rates=tuple(spec.rates),
      affinity_bias=None if affinity_bias is None else tuple(float(b) for b in affinity_bias),
      axis_name=axis_name,
      **kwargs,
  )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """DeepLab's poly schedule ``lr · (1 - step/steps)^power`` (optax), after an optional linear warm-up."""
  t = config.train
  poly = optax.polynomial_schedule(
      init_value=t.learning_rate,
      end_value=t.end_learning_rate,
      power=t.lr_power,
      transition_steps=max(t.num_steps - t.warmup_steps, 1),
  )
  if not t.warmup_steps:
    return poly
  warm = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
  return optax.join_schedules([warm, poly], [t.warmup_steps])


def _kernel_mask(params):
  return flax.traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Weight decay on kernels (DeepLab's L2 regulariser) then SGD with momentum on the poly schedule."""
  return optax.chain(
      optax.add_decayed_weights(config.train.weight_decay, mask=_kernel_mask),
      optax.sgd(learning_rate_schedule(config), momentum=config.train.momentum),
  )


def create_train_state(spec: RunSpec, model: DeepLabV3Plus, rng: jax.Array) -> TrainState:
  """Initialises the variables (and loads ImageNet weights into the backbone when configured)."""
  config = spec.config
  size = config.dataset.crop_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False, output_stride=config.model.train_output_stride))
  variables = flax.core.unfreeze(init({"params": rng, "dropout": rng}, dummy))
  weights = spec.pretrained
  if weights is not None:
    variables = pretrained.load_pretrained_backbone(variables, weights, config.model.depth, config.model.stem)
    logging.info("Loaded ImageNet backbone weights from %s", weights)
  params = variables["params"]
  if spec.structure == "aaf":  # extra parameters beside the model's (flax ignores them)
    params[AAF_PARAMS] = structure_losses.init_adaptive_weights(
        config.dataset.num_classes, len(config.structure.aaf_dilations)
    )
  tx = create_optimizer(config)
  # TrainState.create's tx.init outside jit compiles one zeros program per parameter shape; one program here
  opt_state = jax.jit(tx.init)(params)
  return TrainState(
      step=0, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state, batch_stats=variables["batch_stats"]
  )


def state_template(spec: RunSpec) -> TrainState:
  """A train state of ``spec``'s structure to restore a checkpoint into: zeros of every variable's shape and
  dtype (the checkpoint replaces every variable). Built from ``jax.eval_shape``, so nothing is compiled or
  initialised: evaluation and prediction start without the seconds a ResNet-101 initialisation takes."""
  c = ml_collections.ConfigDict(spec.config.to_dict())
  c.model.pretrained = config_checks.PRETRAINED_NONE
  spec = dataclasses.replace(spec, config=c, pretrained=None)
  model = build_model(spec, axis_name=None)
  shapes = jax.eval_shape(lambda: create_train_state(spec, model, jax.random.key(0)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def restore_variables(
    spec: RunSpec, workdir: str, step: int | None = None, report: Callable[[str], None] = print
) -> tuple[dict, int]:
  """``({"params", "batch_stats"}, step)`` of the newest intact (or exactly ``step``) checkpoint of ``workdir``,
  checked against ``spec`` (:func:`dilaff_jax.engine.checkpoints.restore_from_workdir`): what evaluation, prediction and
  export restore."""
  state, _ = checkpoints.restore_from_workdir(workdir, spec, lambda: state_template(spec), step, report)
  return {"params": state.params, "batch_stats": state.batch_stats}, int(state.step)
