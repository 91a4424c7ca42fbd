"""One module per revision of the tagging database, oldest first by name."""
