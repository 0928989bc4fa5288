"""What `tinyllama demo` runs on, shipped with the package: the sample corpus generator
(sample_corpus.py) and a 40-item multiple-choice evaluation task (tiny_mc/, package data).

Above tasks/ (the corpus comes with its build config), below deployments/; tests and benchmarks
use the same corpus and task.
"""
