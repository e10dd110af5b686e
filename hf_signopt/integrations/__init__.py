"""Glue between hf_signopt and transformers: registrations with the Auto classes and the Trainer."""
