"""What a run leaves on disk: checkpoints (per-rank safetensors shards and a manifest),
the safetensors reader and writer they use, and the run directory (metrics, summary,
progress). Nothing here knows about ranks, actors or the network.
"""
