"""Allow ``python -m interleave_thinker``."""

from interleave_thinker.cli import app

app()
