"""The fake adapter: a platform that lives in memory, for tests and for people
writing an adapter (docs/contributing.md, "The fake adapter")."""
