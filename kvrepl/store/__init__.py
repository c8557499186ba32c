"""The store floor: SQLite (sessions, the message tree, stats) and the K/V pool."""
