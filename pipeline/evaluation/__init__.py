"""Scoring a night's results per adapter (`metrics`), its terminal table (`report`) and charts (`charts`)."""
