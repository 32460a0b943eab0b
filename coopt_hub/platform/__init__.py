"""The platform's commands: init, status, verify, merge (and the dataset card)."""
