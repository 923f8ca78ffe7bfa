"""Back ends of `bench.judge`: the SQLite answer cache, the OpenAI-compatible judge, the local judges.
Import the public names from `bench.judge`."""
