"""Model surgery: frankenMoE assembly (moe.py)."""
