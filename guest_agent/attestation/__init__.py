"""Fetching attestation evidence inside the guest."""
