"""Everything in calm-ray that knows about Ray: activation transport, actors, Serve deployments."""
