"""unilip_ds: training system for the UniLIP autoencoder and its generator."""

__version__ = "0.1.0"
