"""Image towers for training: pretrained trunks built from weights that install offline."""
