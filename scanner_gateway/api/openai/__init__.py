"""The OpenAI-compatible API: the relay's door (`relay.py`), the routes FastAPI serves
(`routes.py`: models, and `scan/<task>` models on chat and Responses), and how a scan
is framed as a chat completion or a response, SSE included (`chat_frames.py`,
`responses_frames.py`)."""

from scanner_gateway.api.openai.routes import router

__all__ = ["router"]
