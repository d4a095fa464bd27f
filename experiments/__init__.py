"""sparseformer.experiments"""
