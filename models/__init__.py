"""sparseformer.models"""
