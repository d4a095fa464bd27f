"""sparseformer.layers"""
