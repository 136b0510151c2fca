"""An OpenAI-compatible HTTP server over the continuous-batching engine (run by `orionlm serve`).

Needs the `serve` extra (FastAPI and uvicorn): `pip install orionlm[serve]`.
"""

from ..errors import require

require("fastapi", "serve", "the server")
