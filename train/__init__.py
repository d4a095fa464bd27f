"""sparseformer.train"""
