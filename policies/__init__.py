"""Shipped learned unmasking policies (catalog comes with the `learned` sampler)."""
