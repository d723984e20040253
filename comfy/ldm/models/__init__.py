"""First-stage (autoencoder) models in the LDM checkpoint layout; see autoencoder.py."""
