"""What a test reads off a model without running it: the convolutions it calls."""

from functools import partial

import flax.linen as nn
import jax


def conv_calls(model, images, **apply_kwargs):
  """``(kernel shape [kh, kw, in / groups], kernel dilation)`` of every ``nn.Conv`` the model calls, in call order:
  the rates as the layers are configured (on a CPU, atrous convolutions run tap by tap, so the program itself holds
  no dilated convolution to read them from)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      dilation = module.kernel_dilation
      dilation = (dilation,) * 2 if isinstance(dilation, int) else tuple(dilation or (1, 1))
      kernel = tuple(module.kernel_size) + (args[0].shape[-1] // module.feature_group_count,)
      calls.append((kernel, dilation))
    return next_fun(*args, **kwargs)

  variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), images)
  with nn.intercept_methods(record):
    jax.eval_shape(partial(model.apply, train=False, **apply_kwargs), variables, images)
  return calls
