"""Assemble the collateral source a verification uses from what the user supplied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coffer.evidence.collateral import (
    ChainedSource,
    CollateralSource,
    DiskCache,
    HttpGetter,
    HttpxGetter,
    default_cache_dir,
)

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
DEFAULT_PCS_URL = "https://api.trustedservices.intel.com"


@dataclass(frozen=True, kw_only=True)
class CollateralSettings:
    """Offline files first, then (only when ``fetch`` is set) AMD KDS and Intel PCS, with a cache."""

    endorsements: Path | None = None
    collateral_dir: Path | None = None
    fetch: bool = False
    kds_url: str = DEFAULT_KDS_URL
    pcs_url: str = DEFAULT_PCS_URL
    cache_dir: Path | None = None
    timeout: float = 10.0


def build_collateral_source(
    settings: CollateralSettings, *, getter: HttpGetter | None = None
) -> CollateralSource:
    # Imported here so that verifying one TEE does not load every TEE's code.
    sources: list[CollateralSource] = []
    if settings.endorsements is not None:
        from coffer.evidence.snp.endorsements import OfflineSnpEndorsements  # noqa: PLC0415

        sources.append(OfflineSnpEndorsements(settings.endorsements))
    if settings.collateral_dir is not None:
        from coffer.evidence.dcap.sources import OfflineIntelCollateral  # noqa: PLC0415

        sources.append(OfflineIntelCollateral(settings.collateral_dir))
    if settings.fetch:
        from coffer.evidence.dcap.sources import PcsFetcher  # noqa: PLC0415
        from coffer.evidence.snp.endorsements import KdsFetcher  # noqa: PLC0415

        http = getter or HttpxGetter(timeout=settings.timeout)
        cache = DiskCache(settings.cache_dir or default_cache_dir())
        sources.append(KdsFetcher(base_url=settings.kds_url, getter=http, cache=cache))
        sources.append(PcsFetcher(base_url=settings.pcs_url, getter=http, cache=cache))
    return ChainedSource(sources)
