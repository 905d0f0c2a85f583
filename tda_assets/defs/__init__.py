"""The Dagster layer: definitions parts (partitions, configs, assets by stage, checks, sensors, plots)."""
