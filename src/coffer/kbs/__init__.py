"""The key broker service (Trustee KBS protocol 0.4.0): protocol models, sessions, resource store,
resource policy, JWE wrapping, the HTTP app and the guest-side client."""
