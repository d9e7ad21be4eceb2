"""The attestation service: verifies evidence (through :mod:`coffer.evidence`), appraises it against
reference values with a Rego policy, and issues EAR attestation tokens."""
