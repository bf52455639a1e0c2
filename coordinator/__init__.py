"""Coordinator: federation loop, leasing, intake, aggregation, database, REST API."""
