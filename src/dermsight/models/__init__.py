"""Models: pretrained image backbones and the networks built on them."""
