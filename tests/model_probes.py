"""What a test reads off a model without running it: the convolutions it calls."""

from dilaff_jax.models.probes import recorded_convs


def conv_calls(model, images, **apply_kwargs):
  """``(kernel shape [kh, kw, in / groups], kernel dilation)`` of every ``nn.Conv`` the model calls, in call order:
  the rates as the layers are configured (on a CPU, atrous convolutions run tap by tap, so the program itself holds
  no dilated convolution to read them from)."""
  calls = []
  for module, in_shape, _ in recorded_convs(model, images, train=False, **apply_kwargs):
    dilation = module.kernel_dilation
    dilation = (dilation,) * 2 if isinstance(dilation, int) else tuple(dilation or (1, 1))
    calls.append((tuple(module.kernel_size) + (in_shape[-1] // module.feature_group_count,), dilation))
  return calls
