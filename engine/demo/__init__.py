"""The built-in demo model: procedural shapes data, its evaluator, training recipe and quality bench.

Everything here exists so that ditstream runs, tests and benchmarks offline with a model that
really generates recognisable images, in the same diffusers layout as SANA-Sprint.
"""
