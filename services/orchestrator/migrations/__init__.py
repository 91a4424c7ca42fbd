"""Revisions of the orchestrator database (services/common/migrations.py applies them at start-up)."""
