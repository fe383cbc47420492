"""Built-in tools for function calling: ``current_time`` and ``calculator``."""
