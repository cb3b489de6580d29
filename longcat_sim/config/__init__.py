"""One typed config per concern, each field with its help, unit and validator once.

The model (``model.config.ModelConfig``), hardware (``cluster.hardware.Hardware``) and
assumption (``cluster.assumptions.Assumptions``) concerns live beside their engines and use
this package's validators, TOML reader and hash; ``deployment`` and ``report`` live here. A
field's name is its command-line option (``config.flags``), TOML key and JSON key.

This package sits just above ``errors`` in the import layers, so every engine can use it; it
never imports an engine.
"""
