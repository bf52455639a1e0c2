"""Coordinator: federation loop, scheduler, aggregation, database, REST API."""
