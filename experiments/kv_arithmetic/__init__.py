"""The key-value experiment (the paper's Table 1 at small scale); see README.md here."""
