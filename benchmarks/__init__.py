"""sparseformer.benchmarks"""
