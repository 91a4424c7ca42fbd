"""One module per revision of the orchestrator database, oldest first by name."""
