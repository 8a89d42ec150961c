"""Files in and out: load models, weights and inputs (:mod:`~normfold.io.load`, sniffed without
torch by :mod:`~normfold.io.sniff`), export ONNX and ``.pt2`` (:mod:`~normfold.io.export`), write
only what normfold can prove it wrote (:mod:`~normfold.io.files`), and the size limits on reading.
"""
