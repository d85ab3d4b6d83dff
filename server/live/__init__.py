"""Live streams: the WebSocket endpoint and its wire protocol."""
