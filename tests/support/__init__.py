"""Shared test helpers: reference problem generators, an independent online-softmax twin, GPU fixtures."""
