"""Training of shared-A role adapters."""
