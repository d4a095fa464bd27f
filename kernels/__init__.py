"""sparseformer.kernels"""
