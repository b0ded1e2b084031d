"""The ``wedefi-dr`` command line, one module per command group."""
