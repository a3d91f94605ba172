"""Training tasks. Importing this package registers them."""

from unilip_ds.tasks import recon  # noqa: F401
