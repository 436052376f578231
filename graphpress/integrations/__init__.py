"""Integrations that drive the whole pipeline from another system: the ``torch.compile``
backend named ``graphpress`` (:mod:`graphpress.integrations.torch_compile`)."""
