"""Alembic migrations of the controller's database (run by `db.open_database`)."""
