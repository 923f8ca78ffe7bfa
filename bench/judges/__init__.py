"""The code behind `bench.judge`: `cache` (the SQLite answer cache), `openai_compat` and `local` (LLM judges),
`ratings` (items, ratings, the answer parser), `templates` (rubric and prompt templates), `template_grader` (the
LLM grader) and `offline` (the offline grader). Import the public names from `bench.judge`."""
