"""The ``sample`` attester: evidence without a TEE, for development and tests.

Two forms:

* ``trustee`` (default): what the CoCo sample attester sends, ``{"svn": "1", "report_data":
  "<std base64 of the digest>"}``; unsigned, accepted by a Trustee-compatible sample verifier.
* ``signed``: Coffer's sample evidence (:func:`coffer.evidence.sample.make_sample_evidence`), an ECDSA
  P-256 signature over the fields by a key of the attester's own, carrying a measurement and the
  init-data digest. It proves integrity in transit, nothing about a platform (claims stay insecure).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec

from coffer.evidence.sample import make_sample_evidence
from coffer.guest.attesters.base import b64, check_digest

SampleForm = Literal["trustee", "signed"]


class SampleAttester:
    tee = "sample"

    def __init__(
        self,
        *,
        form: SampleForm = "trustee",
        svn: int = 1,
        measurement: bytes = b"\0" * 48,
        init_data: bytes = b"",
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        if form not in ("trustee", "signed"):
            raise ValueError(f"unknown sample evidence form {form!r} (trustee or signed)")
        self.form: SampleForm = form
        self.svn = svn
        self.measurement = measurement
        self.init_data = init_data
        self._key = key

    def evidence(self, runtime_digest: bytes) -> dict[str, Any]:
        digest = check_digest(runtime_digest)
        if self.form == "trustee":
            return {"svn": str(self.svn), "report_data": b64(digest)}
        if self._key is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
        signed = make_sample_evidence(report_data=digest, init_data=self.init_data,
                                      measurement=self.measurement, svn=self.svn, key=self._key)
        doc: dict[str, Any] = json.loads(signed)
        return doc
