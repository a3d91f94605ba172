"""Training tasks. Importing this package registers them."""

from unilip_ds.tasks import gen, recon  # noqa: F401
