"""tda: training data attribution by unlearning for text-to-music diffusion models, as a Dagster data product."""
