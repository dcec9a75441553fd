"""Schema revisions, one file each; alembic finds them by path, not by import."""
