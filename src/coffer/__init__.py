"""Coffer: confidential containers with hardware attestation."""

__version__ = "0.1.0"
