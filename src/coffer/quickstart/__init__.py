"""``coffer quickstart``: sample images of real Debian applications, built locally, then protected and run.

:mod:`coffer.quickstart.images` builds the OCI image layouts (NGINX, Redis, Memcached and a small
Python web app) from Debian packages, with no registry involved.
"""
