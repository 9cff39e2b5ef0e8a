"""Autoencoder, classifiers, preprocessing and the composite defended model."""
