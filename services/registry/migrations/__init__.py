"""Revisions of the registry database (services/common/migrations.py applies them at start-up)."""
