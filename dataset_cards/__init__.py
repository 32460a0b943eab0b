"""Jinja templates of the cards coopt-hub writes (installed as the coopt_hub.dataset_cards package)."""
