"""Alembic migrations of the results store, shipped inside the package so a wheel can migrate."""
