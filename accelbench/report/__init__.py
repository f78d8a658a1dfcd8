"""result.json and the reports rendered from it."""
