"""Quantization passes: ``insert_fake_quant`` (``placement`` finds the layers and operands,
``calibrate`` observes activations, ``reference`` is the contract's independent reference)."""
