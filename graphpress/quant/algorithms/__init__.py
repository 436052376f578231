"""Weight-quantization algorithms on plain tensors, used by the quantization passes: activation
statistics over calibration batches (``statistics``), GPTQ (``gptq``), AWQ's scale and clipping
searches (``awq``), bias correction (``bias_correction``), EoRA's low-rank compensation
(``eora``) and the round-to-nearest grid they share (``grid``)."""
