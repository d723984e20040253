"""Graph execution building blocks used by execution.py: the dynamic prompt and execution order
(graph.py), output/object caches (caching.py), input type checks (validation.py), per-node progress
state (progress.py) and the helpers node packs use to build sub-graphs (graph_utils.py)."""
