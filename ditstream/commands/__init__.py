"""The ``ditstream`` subcommands, one module per group (see ``ditstream.cli``)."""
