"""Item representations from a pretrained language model reading the public catalogue text."""
