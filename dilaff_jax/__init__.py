"""dilaff_jax: DeepLabv3+ with dilated affinity (Wu et al.), in JAX/Flax."""

__version__ = "0.1.0"
