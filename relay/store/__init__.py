"""Persistence: keys, jobs and the quota held against them (SQLAlchemy Core over SQLite or PostgreSQL)."""
