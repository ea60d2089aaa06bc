"""Test models: small builders (models.build) and real models from PyPI wheels (models.real)."""
