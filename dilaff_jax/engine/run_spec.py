"""A run's spec: its validated config and what every job derives from it, computed once at start-up.

Training, evaluation, prediction and export build one :class:`RunSpec` from the config they run with and pass it
down, instead of the config and its rate set side by side and each function re-deriving the rest.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from dilaff_jax.engine import config_checks
from dilaff_jax.method import affinity


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
  """``config`` and its derived values.

  Attributes:
    config: the run's config (validated by :func:`config_checks.validate` before the spec is built).
    rates: the explicit rate pairs of the dilated affinity, the paper's R (shorthand expanded), or ``()`` when
      ``affinity.enabled`` is off (the plain DeepLabv3+ baseline: no affinity head, no affinity loss).
    structure: Table 5's structure loss, ``"none"``, ``"aaf"`` or ``"boundary"``.
    reading: how propagation (Eq. 6-7) is read, ``"paper"`` or ``"anchored"`` (conventions §9).
    pretrained: the ImageNet weights file of the backbone, or None for random initialisation.
  """

  config: ml_collections.ConfigDict
  rates: affinity.Rates
  structure: str
  reading: str
  pretrained: str | None

  @property
  def has_affinity(self) -> bool:
    """Whether the model has the affinity head (and the loss its term β · L_aff, Eq. 5)."""
    return bool(self.rates)

  @property
  def anchored(self) -> bool:
    return self.reading == "anchored"


def derive(config: ml_collections.ConfigDict) -> RunSpec:
  """The spec of ``config`` (raises :class:`config_checks.ConfigError` for a bad rate set)."""
  return RunSpec(
      config=config,
      rates=config_checks.rates_of(config),
      structure=config_checks.structure_kind(config),
      reading=config_checks.propagation_reading(config),
      pretrained=config_checks.pretrained_path(config),
  )
