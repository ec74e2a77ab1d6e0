"""What a model's forward pass calls, read off without computing it: its convolutions, with their shapes."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax


def recorded_convs(model: nn.Module, images, **apply_kwargs) -> list[tuple[nn.Conv, tuple, tuple]]:
  """``(module, input shape, output shape)`` of every ``nn.Conv`` that ``model.apply(variables, images,
  **apply_kwargs)`` calls, in call order; ``module`` is an unbound copy (its settings, e.g. kernel size and
  dilation as configured, and its ``conv_general_dilated``). Shapes only: ``images`` may be a
  ``jax.ShapeDtypeStruct`` and nothing is computed."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      calls.append((context.module.clone(parent=None, name=None), tuple(args[0].shape), tuple(out.shape)))
    return out

  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
  with nn.intercept_methods(record):
    jax.eval_shape(partial(model.apply, **apply_kwargs), variables, images)
  return calls
