"""Named variants of a config file (``--config=FILE:NAME``): each one a set of dotted keys to override."""

import difflib

from dilaff_jax import errors

BASELINE = {"affinity.enabled": False}  # plain DeepLabv3+, the paper's baseline
# Table 5's other ways of using structure: plain DeepLabv3+ trained with one of them (dilaff_jax.method.structure_losses)
STRUCTURE = {kind: {**BASELINE, "structure.kind": kind} for kind in ("aaf", "boundary")}


class UnknownVariant(errors.UserError, ValueError):
  """A ``--config=FILE:VARIANT`` naming no variant of the file."""


def affinity_row(rates, scheme: str, beta: float) -> dict:
  """The keys of one row of the paper's Tables 1–2: the rate set R, the weighting scheme and its β."""
  return {"affinity.rates": rates, "affinity.scheme": scheme, "affinity.beta": beta}


def apply(config, variant: str, variants: dict, also: tuple[str, ...] = ()):
  """Sets the keys of ``variants[variant]`` ("" = the config unchanged). ``also``: the file's other variant names
  (handled before this call), listed with the others when ``variant`` is unknown."""
  if not variant:
    return config
  if variant not in variants:
    known = sorted({*variants, *also})
    close = difflib.get_close_matches(variant, known, n=1, cutoff=0.5)
    raise UnknownVariant(
        f"unknown config variant {variant!r}"
        + (f" (did you mean {close[0]}?)" if close else "")
        + f"; known: {', '.join(known)}"
    )
  config.update_from_flattened_dict(variants[variant])
  return config
