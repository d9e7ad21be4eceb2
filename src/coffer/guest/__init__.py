"""The guest side of attestation: attesters that turn a runtime-data digest into the TEE evidence
the Trustee KBS protocol carries as ``primary_evidence``.

``attester_for(tee, **options)`` returns an :class:`~coffer.guest.attesters.base.Attester`; the KBS
client (:mod:`coffer.kbs.client`) hashes the runtime data and calls ``evidence(digest)``.
"""

from coffer.guest.attesters import TEES, attester_for
from coffer.guest.attesters.base import Attester, AttesterError

__all__ = ["TEES", "Attester", "AttesterError", "attester_for"]
