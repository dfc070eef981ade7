"""Prefect flows: schedules, base-model watch, retries, one task run per DVC stage. No stage logic here."""
