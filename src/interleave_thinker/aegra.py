"""What Aegra loads (``aegra.json``): the server graph and the extra routes as a FastAPI app.

Aegra imports graphs only from a file (``./src/interleave_thinker/aegra.py:graph``) and mounts
only FastAPI apps (``interleave_thinker.aegra:app``); both are the same graph and handlers that
``langgraph dev`` serves from ``langgraph.json``. Needs the ``server`` extra (Python >= 3.12).
"""

from interleave_thinker.routes import make_fastapi_app
from interleave_thinker.server import graph

__all__ = ["app", "graph"]

app = make_fastapi_app()
