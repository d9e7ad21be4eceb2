"""Local stand-ins for hardware that development machines and CI do not have.

:mod:`coffer.sandbox.swtpm` runs a software TPM 2.0 (``swtpm``) with an endorsement key certificate
issued by a local CA, so the ``tpm`` attester and the server's AK checks can be exercised for real.
"""
