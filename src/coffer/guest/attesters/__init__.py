"""Attesters by TEE name (the Trustee ``tee`` names).

``attester_for(tee, **options)`` builds one; the options are the keyword arguments of the class:

* ``sample`` -> :class:`~coffer.guest.attesters.sample.SampleAttester` (``form="trustee"|"signed"``);
* ``tpm`` -> :class:`~coffer.guest.attesters.tpm.TpmAttester` (``tcti=...``);
* ``snp``/``tdx`` -> :class:`~coffer.guest.attesters.tsm.SnpAttester` /
  :class:`~coffer.guest.attesters.tsm.TdxAttester` (configfs-tsm, device fallback);
* ``az-snp-vtpm``/``az-tdx-vtpm`` -> :class:`~coffer.guest.attesters.azure.AzSnpVtpmAttester` /
  :class:`~coffer.guest.attesters.azure.AzTdxVtpmAttester`.

Modules are imported on demand, so a guest without tpm2-tools can still use the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from coffer.errors import UnsupportedError
from coffer.guest.attesters.base import Attester

_REGISTRY: dict[str, tuple[str, str]] = {
    "sample": ("coffer.guest.attesters.sample", "SampleAttester"),
    "tpm": ("coffer.guest.attesters.tpm", "TpmAttester"),
    "snp": ("coffer.guest.attesters.tsm", "SnpAttester"),
    "tdx": ("coffer.guest.attesters.tsm", "TdxAttester"),
    "az-snp-vtpm": ("coffer.guest.attesters.azure", "AzSnpVtpmAttester"),
    "az-tdx-vtpm": ("coffer.guest.attesters.azure", "AzTdxVtpmAttester"),
}
TEES: tuple[str, ...] = tuple(_REGISTRY)


def attester_for(tee: str, **options: Any) -> Attester:
    """The attester for ``tee`` built with ``options``; UnsupportedError for an unknown TEE."""
    try:
        module_name, class_name = _REGISTRY[tee]
    except KeyError:
        raise UnsupportedError(f"no attester for TEE {tee!r} (known: {', '.join(TEES)})") from None
    cls = getattr(import_module(module_name), class_name)
    attester: Attester = cls(**options)
    return attester
