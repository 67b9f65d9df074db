"""Serving: deployments, decode engine, augmenting rows, batch caches, config, the OpenAI API."""
