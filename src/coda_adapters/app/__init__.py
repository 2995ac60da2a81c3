"""The ``coda`` application: command line, training jobs, benchmarks, experiments and demos.

It imports the library (:mod:`coda_adapters`) and adds what only the application needs (accelerate,
scikit-learn, tqdm, matplotlib: the ``app`` extra). The library never imports this package.
"""
