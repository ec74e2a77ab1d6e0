"""Process plumbing: command-line parsing and one-line errors, TensorFlow's environment, host memory, multi-host
start-up, preemption and the workdir lock."""
