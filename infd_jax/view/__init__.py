"""A deep-zoom web viewer: any tile of a generated image, rendered on demand at any zoom.

`infd view PATH` (`cli.py`) serves a page (OpenSeadragon over the Deep Zoom
protocol, `dzi.py`) whose tiles are rendered from a model's neural field
(`model_source.py`) or read from existing outputs (`file_source.py`), batched
(`batching.py`) and cached (`caches.py`) by the tile service (`tiles.py`) behind
a Starlette app (`server.py`).
"""
