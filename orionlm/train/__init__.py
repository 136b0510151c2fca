"""Training: the trainer loop, optimizers (AdamW, Muon), learning-rate schedules and recipes."""
