"""Mini-Omni training (stages 1-3 of the paper) on torch.distributed: ``omniframe train``."""
