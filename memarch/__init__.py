"""memarch: memory architectures for sequence models in JAX/Flax.

Layout (see ../shared/DESIGN.md): `memory` (pure memory math), `layers` (Flax modules), `models`
(whole models + registry), `data` (tasks and pipelines), and the research loop's parts
(`train`, `sharding`, `checkpoint`, `generate`, `metrics`, `optim`).
"""

__version__ = "0.1.0"
