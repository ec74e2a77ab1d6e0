"""What every job shares: config validation, the train state and step, checkpoints, inference, metrics, the
evaluation report, pictures and the dense CRF."""
