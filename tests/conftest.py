"""Test setup: 8 virtual CPU devices for the multi-device tests (set before JAX creates its backend)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
