"""TensorFlow's process environment for this project's commands."""

import os


def set_defaults() -> None:
  """Call before anything loads TensorFlow. TensorFlow runs only the input pipeline: its C++ logs stay off the
  terminal, and so does the notice it prints on CPUs where it turns oneDNN on by default (AVX-512 VNNI, AMX), whatever
  ``TF_CPP_MIN_LOG_LEVEL`` says: oneDNN stays off, as on every other CPU. A variable the user set is kept."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
