"""The Ray Serve application: deployments only wire `hlm` classes together."""
