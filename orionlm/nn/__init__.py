"""Building blocks of the decoder, one concern per module."""
