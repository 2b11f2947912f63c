"""Studies built on the core (not part of training or evaluation):

  deep_supervision  the paper's deep-supervision and pruning study
                    (scripts/ablate_deep_supervision.py)
  throughput        timing of the train step, pruned inference and the input (scripts/benchmark.py)
"""
