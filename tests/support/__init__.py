"""Test helpers shared by several test packages (real PostgreSQL server, ...)."""
