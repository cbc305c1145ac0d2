"""``opd serve``: vLLM's completions API over a model directory (``app``), its request shapes and checks
(``api``), and what it holds (``served``: the model, its LoRA adapters, one worker thread)."""

from opd.server.app import BackgroundServer, ServerConfig, create_app, free_port, serve

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "free_port", "serve"]
