"""Job entry points: `python -m pipelines.<job>` locally, `ray job submit -- python -m pipelines.<job>` on a cluster."""
