"""rn50: the small core every stage of the pipeline imports.

It holds exactly one copy of what the stages share:

* :mod:`rn50.model`       - the network (torchvision's ResNet50, which is v1.5) and its initialisation
* :mod:`rn50.preprocess`  - the preprocessing contract and its two implementations (DALI and torchvision)
* :mod:`rn50.layout`      - the ImageNet folder layout and class names
* :mod:`rn50.checkpoint`  - checkpoint save/load (atomic, ``weights_only``-loadable)
* :mod:`rn50.manifest`    - the JSON manifest that sits beside every artifact
* :mod:`rn50.atomic`      - write-to-temp-then-rename helpers
* :mod:`rn50.metrics`     - top-k accuracy
* :mod:`rn50.ort`         - a quiet ONNX Runtime session factory
"""

__version__ = "0.1.0"
