"""Model surgery: frankenMoE assembly (moe.py), weight merges (weights.py), their shared input handling
(sources.py)."""
