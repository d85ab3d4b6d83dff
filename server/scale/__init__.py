"""Scale-out over Redis: the gateway, the worker, their wire messages and config."""
