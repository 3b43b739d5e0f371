"""Cost models: block sizes and FLOPs (``blocks``), per-token latency and memory (``latency``:
``paper`` and ``decode``), and migration delay (``migration``). Pure."""
