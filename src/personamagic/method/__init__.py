"""The method of the paper, one module per part: the stage mapper (`mapper`), S*'s tokens (`tokens`), the
text conditioning with its token-embedding override and the whole sampling run's encoding
(`conditioning`), the UNet's residual-on-V attention processors (`attention`), the losses of Eq. 1-4
(`losses`), and the stage partition with its `StageWindow` (`stages`). Pure functions and small
modules over tensors; the training loop and the pipeline use them."""
