"""Training code for Vedas, installed under the import name ``vedas_trainer``."""
