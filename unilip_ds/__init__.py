"""unilip_ds: training system for the UniLIP autoencoder and its generator."""

import logging as _logging

__version__ = "0.1.0"


class _NoEmptyFp32Warning(_logging.Filter):
    """diffusers' ModelMixin.to(dtype) warns "modules ... should be kept in float32: []" for
    every model, also when the list is empty (no module is): that case is dropped, a
    non-empty list still prints."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kept in float32: []" not in record.getMessage()


_logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Warning())
