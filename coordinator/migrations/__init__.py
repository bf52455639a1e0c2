"""Alembic migrations of the coordinator database (shipped in the wheel)."""
