"""smallbig: reproduce and audit SmallBigNet (Li et al., CVPR 2020)."""

__version__ = "0.1.0"
