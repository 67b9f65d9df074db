"""The OpenAI-shaped HTTP API: request schemas, errors, detokenising, retries, the app."""
