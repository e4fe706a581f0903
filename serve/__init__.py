"""Serving engine: one cache shared by all roles."""
