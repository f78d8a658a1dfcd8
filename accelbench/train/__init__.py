"""Training data and loop: LLaVA-1.5 records, templates, images, synthetic data."""
