"""The HTTP API: the app factory, REST routes, auth and admission."""
