"""`qwenhw serve`: an OpenAI-compatible HTTP server over the Engine protocol, for every backend.

    server = make_server(engine, "127.0.0.1", 0, api_key="k")   # bound; port 0 picks a free one
    server.start()                                              # serve in a daemon thread
    ...  openai.OpenAI(base_url=server.url, api_key="k")
    server.shutdown(); server.server_close()
"""

from .protocol import APIError
from .server import OpenAIServer, make_server

__all__ = ["APIError", "OpenAIServer", "make_server"]
