"""A run of a recipe into OUT: planning (each input read once), claiming OUT, executors, the
worker that joins rendering and writing, and finalize.

May import every layer below it; only the CLI imports it.
"""
