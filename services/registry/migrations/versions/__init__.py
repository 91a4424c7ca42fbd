"""One module per revision of the registry database, oldest first by name."""
