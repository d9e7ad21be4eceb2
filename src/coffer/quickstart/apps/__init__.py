"""Files shipped inside the quickstart sample images (read as data, not imported by Coffer)."""
