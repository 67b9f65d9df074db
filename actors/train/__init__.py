"""Training: config, data (datasets -> Ray Data), augmenting actor pool, worker loop, pipeline."""
