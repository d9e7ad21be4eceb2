"""Image protection: OCI layouts, ocicrypt layer encryption, signatures and unpacking.

The package keeps pure parsing apart from I/O:

* :mod:`coffer.image.media` -- media type names, the ``+encrypted`` variants and the allow-list;
* :mod:`coffer.image.models` -- descriptors, manifests, indexes and configs parsed strictly from bytes;
* :mod:`coffer.image.reference` -- the transport names users type (``oci:``, ``docker-archive:``,
  ``docker://``) parsed into typed references;
* :mod:`coffer.image.layout` -- reading and writing OCI image layout directories, every blob checked
  against its digest and size;
* :mod:`coffer.image.unpack` -- the root-confined unpack of layer tarballs the workload uses.
"""
