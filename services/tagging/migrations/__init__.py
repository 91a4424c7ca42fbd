"""Revisions of the tagging database (services/common/migrations.py applies them at start-up)."""
